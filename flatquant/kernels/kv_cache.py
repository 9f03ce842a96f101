"""Kernels of a real 4-bit K/V cache: packed cache writes and decode attention over the packed codes.

Usage::

    from flatquant.kernels.kv_cache import decode_attention, kv_quant_pack, rope_k_quant_pack
    vc, vs, vz = kv_quant_pack(v, clip=0.95)                        # v: (B, Hkv, T, D) → packed V cache
    kc, ks, kz = rope_k_quant_pack(k, cos, sin, tk, clip=0.95)      # k before RoPE → RoPE, ·Tk, packed K cache
    q = rope_transform(q, cos, sin, tk_inv_t)                       # q before RoPE → RoPE, ·Tk⁻ᵀ (no quantizer)
    q = rope_qkv_write(q, k, v, cos, sin, tk_inv_t, tk, 0.95, 0.95, kcache, vcache, at=pos)   # the three at once
    o = decode_attention(q, kc, ks, kz, vc, vs, vz, lengths)        # q: (B, Hq, D), newest token per sequence

A forward without a cache quantizes K and V and dequantizes them at once (the ``kq``/``vq`` quantizers of
``flatquant.quant_layer.Attention``); generation with ``flatquant.cache.QuantKVCache`` stores the codes instead
(4 + 64/D bits per value, 4.5 at D = 128: half a byte per value plus an fp32 scale and zero per row of D), written
by ``kv_quant_pack`` on the GPU, and its one-token steps attend over them with ``decode_attention``.

Cache format, per (batch, kv head, token) row of D values: asymmetric 4-bit codes, exactly
``flatquant.quantizers.quantize(x, QuantSpec(4, False, "head", D, clip_ratio=clip))`` computed in fp32:
scale = max((clip·max(x, 0) − clip·min(x, 0)) / 15, 1e-8), zero = round(−clip·min(x, 0) / scale),
code = clamp(round(x / scale) + zero, 0, 15), rounding half to even; value = (code − zero)·scale.
codes: (B, H, T, D/2) uint8, two codes per byte, low nibble = even column (``flatquant.packing.pack_int4_offset``
with qmin 0, which for codes 0..15 is the same byte as two's complement); scale, zero: (B, H, T) fp32.
Divisions are correctly rounded (div_rn on the GPU) and the products that must not fuse into an FMA are written
as mul_rn, so codes and scales equal PyTorch's CPU quantizer bit for bit.

Numerics of ``rope_k_quant_pack`` (the reference does the same): RoPE is held in k's dtype, computed as the layer
does, k·cos + rotate_half(k)·sin with cos, sin cast to k's dtype and each product and the sum rounded to it. PyTorch
computes each 16-bit op in fp32 and rounds the result; the kernel does the same (a product of two 16-bit values is
exact in fp32), so the RoPE values are equal bit for bit. The product y = rope(k)·Tk takes Tk in fp32, accumulates
in fp32 and is held in fp32 up to the quantizer: it is not rounded to k's dtype. (The layer's fake-quant path
casts Tk to k's dtype and rounds the product to it, which costs accuracy; the layer writes a QuantKVCache through
this kernel, so the two differ by such roundings.) Only the order of the fp32 sum differs from PyTorch's matmul, so
a code can differ from the reference's only where y/scale sits within a few ulp of a rounding boundary.
``rope_transform`` is the query side (RoPE and ·Tk⁻ᵀ, the product rounded once to q's dtype), which the layer runs
for one-token steps on a QuantKVCache.

``decode_attention`` is flash decoding: each program takes one kv head of one sequence (all its Hq/Hkv query
heads at once, so grouped-query attention reads K/V once) over a chunk of the sequence and runs an online softmax
in fp32; a second kernel merges the chunks. Both products run on tensor cores over the codes centred by 8,
c − 8 in [−8, 7] (exact in fp16, bf16 and tf32), with each token's zero and scale applied outside the product
(``_decode_split_kernel``): scores = (q·(c − 8)ᵀ − (z − 8)·Σq)·scale, P·V = w·(c − 8) − Σ w·(z − 8) with
w = p·scale split into two bf16 parts (2^-18 relative; two tf32 parts, 2^-21, with config pv="tf32" and in the
CPU interpreter). On the GPU a code becomes a 16-bit float in about one instruction (``_c16_asm``).
History, H200, batch 64 × 2100 tokens of LLaMA-3-8B's heads: the first version dequantized in registers and
reduced (heads × tokens × columns) broadcasts, 1.43 ms a call (54–109 GB/s of cache), 45 of a 53 ms decode step;
the second ran both products on tensor cores over code − zero converted per element, 0.23 ms (685 GB/s; Nsight
Compute: latency-bound at 2 programs an SM, 189 registers, 41 % of issue slots busy).
"""
from __future__ import annotations

import math

import torch

from flatquant.packing import pack_int4_offset, unpack_int4_offset
from flatquant.rope import apply_rope

from .kron_quant import HAS_TRITON, _sm_count, cdiv, next_pow2, use_triton

if HAS_TRITON:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    from .fused import _div  # correctly rounded division
    from .kron_quant import _ROUND_MAGIC, _rne_bf16  # x + M − M rounds fp32 half to even; fp32 → bf16 by hand

    @triton.jit
    def _mul(a, b, EXACT: tl.constexpr):
        """a·b rounded on its own: on the GPU mul_rn, which LLVM and ptxas never contract into an FMA."""
        if EXACT:
            return libdevice.mul_rn(a, b)
        return a * b

    @triton.jit
    def _round_like(v, like, BF16_RNE: tl.constexpr):
        """fp32 v rounded to like's dtype (nearest even), returned as fp32."""
        if BF16_RNE:
            return _rne_bf16(v)
        return v.to(like.dtype).to(tl.float32)

    @triton.jit
    def _rope_cols(x_ptr, cos_ptr, sin_ptr, xrow, rrow, live, cc, D, ROPE: tl.constexpr, EXACT: tl.constexpr,
                   BF16_RNE: tl.constexpr):
        """Columns cc of the rows at xrow as fp32 (ROWS, len(cc)); with ROPE, k·cos + rotate_half(k)·sin
        (rotate_half(k) = [−k₂, k₁]) with each product and the sum rounded to k's dtype, as PyTorch computes it."""
        half = D // 2
        mask = live[:, None] & (cc < D)[None, :]
        x = tl.load(x_ptr + xrow[:, None] + cc[None, :], mask=mask, other=0.0)
        y = x.to(tl.float32)
        if ROPE:
            partner = tl.where(cc < half, cc + half, cc - half)
            xp = tl.load(x_ptr + xrow[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
            rot = tl.where((cc < half)[None, :], -xp, xp)
            c = tl.load(cos_ptr + rrow[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            s = tl.load(sin_ptr + rrow[:, None] + cc[None, :], mask=mask, other=0.0).to(tl.float32)
            y = _round_like(_round_like(_mul(y, c, EXACT), x, BF16_RNE)
                            + _round_like(_mul(rot, s, EXACT), x, BF16_RNE), x, BF16_RNE)
        return y

    @triton.jit
    def _pack_blocks(
        first, step, x_ptr, cos_ptr, sin_ptr, t_ptr, c_ptr, scale_ptr, zero_ptr, at_ptr,
        n_rows, H, T, T_out, D, clip,
        sxb, sxh, sxt, srb, srt, scb, sch, sct, ssb, ssh, sst,
        BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ROPE: tl.constexpr,
        TRANSFORM: tl.constexpr, EXACT: tl.constexpr, BF16_RNE: tl.constexpr, AT: tl.constexpr,
        QUANT: tl.constexpr,
    ):
        """Blocks first, first + step, … of ROWS (b, h, t) rows: [RoPE →] [·Tk →] quantize each row of D, pack.
        QUANT=False stores the row itself instead, rounded to c_ptr's dtype (its row strides scb, sch, sct;
        ``rope_transform``, the query side), and writes no scale or zero.
        With TRANSFORM, y = Σ_k rope(x)[:, k-chunk]·Tk[k-chunk, :] over chunks of BLOCK_K columns (fp32 FMA
        products; the whole 128-deep product at once needs more registers than a thread has and spills).
        AT: row t is stored at token at[0] + t of the output (read on the device, so that a CUDA graph can replay
        the write at a new position); rows past T_out are dropped, so no position writes outside the output."""
        cols = tl.arange(0, BLOCK_D)
        cmask = cols < D
        jh = tl.arange(0, BLOCK_D // 2)
        at = tl.load(at_ptr).to(tl.int64) if AT else 0
        for blk in range(first, tl.cdiv(n_rows, ROWS), step):
            rows = blk * ROWS + tl.arange(0, ROWS)
            live = rows < n_rows
            t = (rows % T).to(tl.int64)
            h = ((rows // T) % H).to(tl.int64)
            b = (rows // T // H).to(tl.int64)
            xrow, rrow = b * sxb + h * sxh + t * sxt, b * srb + t * srt
            if TRANSFORM:
                y = tl.zeros((ROWS, BLOCK_D), tl.float32)
                for k0 in range(0, D, BLOCK_K):
                    kk = k0 + tl.arange(0, BLOCK_K)
                    a = _rope_cols(x_ptr, cos_ptr, sin_ptr, xrow, rrow, live, kk, D, ROPE, EXACT, BF16_RNE)
                    tk = tl.load(t_ptr + kk[:, None] * D + cols[None, :], mask=(kk < D)[:, None] & cmask[None, :],
                                 other=0.0)
                    y = tl.dot(a, tk, y, input_precision="ieee")
            else:
                y = _rope_cols(x_ptr, cos_ptr, sin_ptr, xrow, rrow, live, cols, D, ROPE, EXACT, BF16_RNE)
            mask = live[:, None] & cmask[None, :]
            if not QUANT:
                if BF16_RNE:  # the interpreter truncates fp32 → bf16
                    y = _rne_bf16(y)
                yrow = c_ptr + b * scb + h * sch + t * sct
                tl.store(yrow[:, None] + cols[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)
            else:
                t = t + at
                live = live & (t >= 0) & (t < T_out)
                hi = tl.maximum(tl.max(tl.where(mask, y, -float("inf")), axis=1), 0.0)
                lo = tl.minimum(tl.min(tl.where(mask, y, float("inf")), axis=1), 0.0)
                hi, lo = _mul(hi, clip, EXACT), _mul(lo, clip, EXACT)
                scale = tl.maximum(_div(hi - lo, 15.0, EXACT), 1e-8)
                zero = (_div(-lo, scale, EXACT) + _ROUND_MAGIC) - _ROUND_MAGIC
                v = (_div(y, scale[:, None], EXACT) + _ROUND_MAGIC) - _ROUND_MAGIC + zero[:, None]
                v = tl.minimum(tl.maximum(v, 0.0), 15.0).to(tl.int32)
                even, odd = tl.split(tl.reshape(v, (ROWS, BLOCK_D // 2, 2)))
                crow = c_ptr + b * scb + h * sch + t * sct
                tl.store(crow[:, None] + jh[None, :], (even | (odd << 4)).to(tl.uint8),
                         mask=live[:, None] & (jh < D // 2)[None, :])
                srow = b * ssb + h * ssh + t * sst
                tl.store(scale_ptr + srow, scale, mask=live)
                tl.store(zero_ptr + srow, zero, mask=live)

    @triton.jit
    def _kv_pack_kernel(
        x_ptr, cos_ptr, sin_ptr, t_ptr, c_ptr, scale_ptr, zero_ptr, at_ptr,
        n_rows, H, T, T_out, D, clip,
        sxb, sxh, sxt, srb, srt, scb, sch, sct, ssb, ssh, sst,
        BLOCK_D: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, ROPE: tl.constexpr,
        TRANSFORM: tl.constexpr, EXACT: tl.constexpr, BF16_RNE: tl.constexpr, AT: tl.constexpr,
        QUANT: tl.constexpr = True,
    ):
        """Persistent over blocks of ROWS rows: ``_pack_blocks`` from block program_id on, num_programs apart."""
        _pack_blocks(tl.program_id(0), tl.num_programs(0), x_ptr, cos_ptr, sin_ptr, t_ptr, c_ptr, scale_ptr,
                     zero_ptr, at_ptr, n_rows, H, T, T_out, D, clip,
                     sxb, sxh, sxt, srb, srt, scb, sch, sct, ssb, ssh, sst,
                     BLOCK_D, ROWS, BLOCK_K, ROPE, TRANSFORM, EXACT, BF16_RNE, AT, QUANT)

    @triton.jit
    def _qkv_write_kernel(
        q_ptr, tq_ptr, yq_ptr, k_ptr, tk_ptr, kc_ptr, ks_ptr, kz_ptr, v_ptr, vc_ptr, vs_ptr, vz_ptr,
        cos_ptr, sin_ptr, at_ptr,
        nq, nkv, Hq, Hkv, T, T_out, D, k_clip, v_clip, PQ, PK,
        sqb, sqh, sqt, syb, syh, syt, skb, skh, skt, svb, svh, svt, srb, srt, scb, sch, sct, ssb, ssh, sst,
        BLOCK_D: tl.constexpr, ROWS_Q: tl.constexpr, ROWS_K: tl.constexpr, ROWS_V: tl.constexpr,
        BLOCK_K: tl.constexpr, TQ: tl.constexpr, TK: tl.constexpr, EXACT: tl.constexpr, BF16_RNE: tl.constexpr,
    ):
        """A step's attention inputs in one launch: programs [0, PQ) write q's rows as ``rope_transform`` does,
        [PQ, PQ + PK) K's as ``rope_k_quant_pack`` (at a device position), the rest V's as ``kv_quant_pack``, each
        role persistent over its own blocks (K's and V's caches share their strides)."""
        pid = tl.program_id(0)
        if pid < PQ:
            _pack_blocks(pid, PQ, q_ptr, cos_ptr, sin_ptr, tq_ptr, yq_ptr, yq_ptr, yq_ptr, at_ptr, nq, Hq, T, T, D,
                         1.0, sqb, sqh, sqt, srb, srt, syb, syh, syt, 0, 0, 0,
                         BLOCK_D, ROWS_Q, BLOCK_K, True, TQ, EXACT, BF16_RNE, False, False)
        elif pid < PQ + PK:
            _pack_blocks(pid - PQ, PK, k_ptr, cos_ptr, sin_ptr, tk_ptr, kc_ptr, ks_ptr, kz_ptr, at_ptr, nkv, Hkv, T,
                         T_out, D, k_clip, skb, skh, skt, srb, srt, scb, sch, sct, ssb, ssh, sst,
                         BLOCK_D, ROWS_K, BLOCK_K, True, TK, EXACT, BF16_RNE, True, True)
        else:
            _pack_blocks(pid - PQ - PK, tl.num_programs(0) - PQ - PK, v_ptr, cos_ptr, sin_ptr, tk_ptr, vc_ptr, vs_ptr,
                         vz_ptr, at_ptr, nkv, Hkv, T, T_out, D, v_clip, svb, svh, svt, 0, 0, scb, sch, sct, ssb, ssh,
                         sst, BLOCK_D, ROWS_V, BLOCK_K, False, False, EXACT, BF16_RNE, True, True)

    # Nibbles → 16-bit floats, two per 32-bit register: prmt moves each code byte under the high byte of MAGIC
    # (fp16 0x64: 1024 + c, bf16 0x43: 128 + c, both exact), and one packed subtraction of MAGIC + 8 leaves c − 8,
    # an integer in [−8, 7]. Four bytes in, two registers (four values) out; LO takes the low nibbles.
    def _c16_asm(hi: bool, bf16: bool):
        magic, offset, sub = ("0x43434343", "0x43084308", "sub.rn.bf16x2") if bf16 else \
            ("0x64646464", "0x64086408", "sub.f16x2")
        nib = "shr.b32 u, $2, 4; and.b32 u, u, 0x0F0F0F0F; " if hi else "and.b32 u, $2, 0x0F0F0F0F; "
        return tl.constexpr("{ .reg .b32 u, m, s; " + nib + f"mov.b32 m, {magic}; mov.b32 s, {offset}; "
                            f"prmt.b32 $0, u, m, 0x4140; prmt.b32 $1, u, m, 0x4342; {sub} $0, $0, s; "
                            f"{sub} $1, $1, s; }}")

    _ASM_LO_F16, _ASM_HI_F16 = _c16_asm(False, False), _c16_asm(True, False)
    _ASM_LO_BF16, _ASM_HI_BF16 = _c16_asm(False, True), _c16_asm(True, True)

    @triton.jit
    def _centred(codes, KIND: tl.constexpr, ASM: tl.constexpr):
        """uint8 tile of packed codes → (even, odd) columns as code − 8, integers in [−8, 7] held exactly in
        KIND: 0 fp32, 1 fp16, 2 bf16. ASM: the 16-bit kinds through _c16_asm's PTX (GPU); else per-element ops."""
        if ASM and KIND == 1:
            even = tl.inline_asm_elementwise(_ASM_LO_F16, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
            odd = tl.inline_asm_elementwise(_ASM_HI_F16, "=r,=r,r", [codes], dtype=tl.float16, is_pure=True, pack=4)
        elif ASM and KIND == 2:
            even = tl.inline_asm_elementwise(_ASM_LO_BF16, "=r,=r,r", [codes], dtype=tl.bfloat16, is_pure=True,
                                             pack=4)
            odd = tl.inline_asm_elementwise(_ASM_HI_BF16, "=r,=r,r", [codes], dtype=tl.bfloat16, is_pure=True,
                                            pack=4)
        else:
            even = ((codes & 15).to(tl.int32) - 8).to(tl.float32)
            odd = ((codes >> 4).to(tl.int32) - 8).to(tl.float32)
            if KIND == 1:
                even, odd = even.to(tl.float16), odd.to(tl.float16)
            elif KIND == 2:
                even, odd = even.to(tl.bfloat16), odd.to(tl.bfloat16)
        return even, odd

    @triton.jit
    def _tf32_round(x):
        """x rounded to tf32's 10 mantissa bits (half away from zero): what a tf32 tensor-core input holds exactly."""
        return ((x.to(tl.int32, bitcast=True) + 0x1000) & -8192).to(tl.float32, bitcast=True)

    @triton.jit
    def _dot_exact(a, b, acc, PARTS: tl.constexpr):
        """acc + a·b on tf32 tensor cores with a split into PARTS tf32 pieces (a = a1 + a2 (+ a3), each exact in
        tf32) and b exact in tf32 (small integers): the products are exact to 2^-21 (2 parts) or exactly (3)."""
        a1 = _tf32_round(a)
        r = a - a1
        acc = tl.dot(a1, b, acc, input_precision="tf32")
        if PARTS == 2:
            acc = tl.dot(r, b, acc, input_precision="tf32")
        else:
            a2 = _tf32_round(r)
            acc = tl.dot(a2, b, acc, input_precision="tf32")
            acc = tl.dot(r - a2, b, acc, input_precision="tf32")
        return acc

    @triton.jit
    def _decode_split_kernel(
        q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, len_ptr, o_ptr, m_ptr, l_ptr,
        Hkv, G, D, Tmax, chunk, n_splits, sm_scale,
        sqb, sqh, scb, sch, sct, ssb, ssh, sst, sob, soh,
        BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr, SPLIT: tl.constexpr,
        BF16_RNE: tl.constexpr, QKIND: tl.constexpr, PV_BF16: tl.constexpr, ASM: tl.constexpr,
    ):
        """Program (split s, b·Hkv + h): the G query heads of kv head h over tokens [s·chunk, min(s·chunk + chunk,
        length_b)). Columns stay split into even and odd halves (the two nibbles of a byte), q is read so too.

        Both products run on tensor cores over the codes centred by 8, c − 8 in [−8, 7] (exact in fp16, bf16 and
        tf32), and each token's zero and scale stay outside them: with value = (c − z)·s,
        q·k = (q·(c − 8) − (z − 8)·Σq)·s and Σ_n w_n·v_n = Σ_n w_n·(c_n − 8) − Σ_n w_n·(z_n − 8) with w = p·s, so a
        code is unpacked once and never corrected per element. QKIND 1/2: q·(c − 8) in q's own fp16/bf16 (exact
        products); 0: q in fp32 split into three tf32 parts (exact products). PV_BF16: w split into two bf16
        parts (w = w1 + w2 + O(2^-18·w)), else two tf32 parts (2^-21). Sums are the tensor cores' fp32.
        ASM: codes → 16-bit floats by _c16_asm's PTX (GPU).
        SPLIT: writes the unnormalised partial (acc, max m, sum l) for _decode_merge_kernel, or nothing when the
        chunk starts past the length; else (one split) the normalised output, 0 for length 0."""
        s_id = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Hkv
        h = bh % Hkv
        length = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), Tmax)  # never read outside the cache
        start = s_id * chunk
        end = tl.minimum(start + chunk, length)
        g = tl.arange(0, BLOCK_G)
        gmask = g < G
        j = tl.arange(0, BLOCK_DH)
        jmask = j < D // 2
        hq = h * G + g
        qmask = gmask[:, None] & jmask[None, :]
        q_off = b.to(tl.int64) * sqb + hq.to(tl.int64)[:, None] * sqh + 2 * j[None, :]
        q_even = tl.load(q_ptr + q_off, mask=qmask, other=0.0)
        q_odd = tl.load(q_ptr + q_off + 1, mask=qmask, other=0.0)
        if QKIND == 0:
            q_even, q_odd = q_even.to(tl.float32), q_odd.to(tl.float32)
        q_sum = tl.sum(q_even.to(tl.float32), axis=1) + tl.sum(q_odd.to(tl.float32), axis=1)
        c_base = b.to(tl.int64) * scb + h.to(tl.int64) * sch
        s_base = b.to(tl.int64) * ssb + h.to(tl.int64) * ssh
        m_i = tl.full((BLOCK_G,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_G,), tl.float32)
        acc_even = tl.zeros((BLOCK_G, BLOCK_DH), tl.float32)
        acc_odd = tl.zeros((BLOCK_G, BLOCK_DH), tl.float32)
        for n0 in range(start, end, BLOCK_N):  # every block holds ≥ 1 valid token: m_new is finite
            n = n0 + tl.arange(0, BLOCK_N)
            nmask = n < end
            nl = n.to(tl.int64)
            c_off = c_base + nl[:, None] * sct + j[None, :]
            cmask = nmask[:, None] & jmask[None, :]
            s_off = s_base + nl * sst
            k_even, k_odd = _centred(tl.load(kc_ptr + c_off, mask=cmask, other=0), QKIND, ASM)
            k_scale = tl.load(ks_ptr + s_off, mask=nmask, other=0.0)
            k_zero = tl.load(kz_ptr + s_off, mask=nmask, other=8.0)
            sc = tl.zeros((BLOCK_G, BLOCK_N), tl.float32)
            if QKIND == 0:
                sc = _dot_exact(q_even, tl.trans(k_even), sc, 3)
                sc = _dot_exact(q_odd, tl.trans(k_odd), sc, 3)
            else:
                sc = tl.dot(q_even, tl.trans(k_even), sc)
                sc = tl.dot(q_odd, tl.trans(k_odd), sc)
            sc = (sc - q_sum[:, None] * (k_zero - 8.0)[None, :]) * (k_scale * sm_scale)[None, :]
            sc = tl.where(nmask[None, :], sc, -float("inf"))
            m_new = tl.maximum(m_i, tl.max(sc, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(sc - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_scale = tl.load(vs_ptr + s_off, mask=nmask, other=0.0)
            v_zero = tl.load(vz_ptr + s_off, mask=nmask, other=8.0)
            w = p * v_scale[None, :]
            w_zero = tl.sum(w * (v_zero - 8.0)[None, :], axis=1)[:, None]
            v_codes = tl.load(vc_ptr + c_off, mask=cmask, other=0)
            if PV_BF16:
                v_even, v_odd = _centred(v_codes, 2, ASM)
                w1 = w.to(tl.bfloat16)
                w2 = (w - w1.to(tl.float32)).to(tl.bfloat16)
                acc_even = tl.dot(w2, v_even, tl.dot(w1, v_even, acc_even * alpha[:, None])) - w_zero
                acc_odd = tl.dot(w2, v_odd, tl.dot(w1, v_odd, acc_odd * alpha[:, None])) - w_zero
            else:
                v_even, v_odd = _centred(v_codes, 0, False)
                acc_even = _dot_exact(w, v_even, acc_even * alpha[:, None], 2) - w_zero
                acc_odd = _dot_exact(w, v_odd, acc_odd * alpha[:, None], 2) - w_zero
            m_i = m_new
        if SPLIT:
            row = (b * (Hkv * G) + hq).to(tl.int64) * n_splits + s_id
            wmask = gmask & (g * 0 + start < length)  # (a scalar mask in & trips the interpreter)
            o_off = row[:, None] * D + 2 * j[None, :]
            tl.store(o_ptr + o_off, acc_even, mask=wmask[:, None] & jmask[None, :])
            tl.store(o_ptr + o_off + 1, acc_odd, mask=wmask[:, None] & jmask[None, :])
            tl.store(m_ptr + row, m_i, mask=wmask)
            tl.store(l_ptr + row, l_i, mask=wmask)
        else:
            den = tl.where(l_i > 0.0, l_i, 1.0)[:, None]
            out_even, out_odd = acc_even / den, acc_odd / den
            if BF16_RNE:
                out_even, out_odd = _rne_bf16(out_even), _rne_bf16(out_odd)
            o_off = b.to(tl.int64) * sob + hq.to(tl.int64)[:, None] * soh + 2 * j[None, :]
            tl.store(o_ptr + o_off, out_even.to(o_ptr.dtype.element_ty), mask=qmask)
            tl.store(o_ptr + o_off + 1, out_odd.to(o_ptr.dtype.element_ty), mask=qmask)

    @triton.jit
    def _decode_merge_kernel(
        w_ptr, m_ptr, l_ptr, len_ptr, o_ptr,
        Hq, D, Tmax, chunk, n_splits,
        sob, soh,
        BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, BF16_RNE: tl.constexpr,
    ):
        """Program b·Hq + hq: Σ_s e^(m_s − M)·acc_s / Σ_s e^(m_s − M)·l_s over the cdiv(length, chunk) partials
        that _decode_split_kernel wrote (the others are never read); 0 for length 0."""
        pid = tl.program_id(0)
        b = pid // Hq
        hq = pid % Hq
        length = tl.minimum(tl.maximum(tl.load(len_ptr + b), 0), Tmax)
        sp = tl.arange(0, BLOCK_S)
        smask = sp < (length + chunk - 1) // chunk
        d = tl.arange(0, BLOCK_D)
        dmask = d < D
        row = pid.to(tl.int64) * n_splits + sp
        m = tl.load(m_ptr + row, mask=smask, other=-float("inf"))
        l = tl.load(l_ptr + row, mask=smask, other=0.0)
        acc = tl.load(w_ptr + row[:, None] * D + d[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
        m_max = tl.max(m, axis=0)
        w = tl.exp(m - tl.where(m_max > -float("inf"), m_max, 0.0))  # 0 for unread partials, no ∞ − ∞
        den = tl.sum(l * w, axis=0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.where(den > 0.0, den, 1.0)
        if BF16_RNE:
            out = _rne_bf16(out)
        tl.store(o_ptr + b.to(tl.int64) * sob + hq.to(tl.int64) * soh + d, out.to(o_ptr.dtype.element_ty), mask=dmask)


MAX_SPLITS = 64  # partials per sequence and head: bounds the merge kernel's tile and the fp32 workspace


# ---- references --------------------------------------------------------------------------------------------


def kv_dequant(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """codes (B, H, T, D/2) uint8, scale / zero (B, H, T) fp32 → (code − zero)·scale, (B, H, T, D) fp32."""
    from flatquant.quantizers import dequantize_codes

    B, H, T, Dh = codes.shape
    c = unpack_int4_offset(codes.reshape(-1, Dh), 0)
    return dequantize_codes(c, scale.float().reshape(-1), zero.float().reshape(-1)).view(B, H, T, 2 * Dh)


def kv_quant_pack_ref(x: torch.Tensor, clip: float = 1.0):
    """PyTorch reference of ``kv_quant_pack``: flatquant.quantizers.quantize per (b, h, t) row in fp32, packed."""
    from flatquant.quantizers import QuantSpec, quantize

    B, H, T, D = _check_rows(x, "x")
    q, scale, zero = quantize(x.float(), QuantSpec(4, False, "head", D, clip_ratio=clip))
    codes = pack_int4_offset(q.reshape(-1, D), 0).view(B, H, T, D // 2)
    return codes, scale.reshape(B, H, T), zero.reshape(B, H, T)


def rope_k_quant_pack_ref(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tk: torch.Tensor | None = None,
                          clip: float = 1.0):
    """PyTorch reference of ``rope_k_quant_pack``, from flatquant.quant_layer.Attention's formulas: RoPE in k's dtype,
    then ·tk in fp32 (held in fp32), then ``kv_quant_pack_ref``."""
    return kv_quant_pack_ref(rope_k_transform_ref(k, cos, sin, tk), clip)


def rope_k_transform_ref(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                         tk: torch.Tensor | None = None) -> torch.Tensor:
    """y = rope(k)·tk, (B, H, T, D) fp32: the value ``rope_k_quant_pack`` quantizes (for boundary-aware tests).
    RoPE is flatquant.quant_layer.Attention's formula in k's dtype (tests/test_kv_cache.py checks it against the layer)."""
    _check_rows(k, "k")
    cos, sin = (_rope_table(t, k).unsqueeze(1) for t in (cos, sin))  # (B or 1, 1, T, D) in k's dtype
    y = apply_rope(k, cos, sin).float()
    return y if tk is None else y @ tk.to(device=y.device, dtype=torch.float32)


def decode_attention_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, sm_scale=None,
                         dtype: torch.dtype = torch.float64, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """PyTorch reference of ``decode_attention``: dequantize (fp32, as the kernel), then softmax(q·Kᵀ·sm_scale)·V
    in ``dtype`` over the first lengths[b] tokens, without copying K/V per query head. Positions ≥ length are
    zeroed before use, so whatever they hold does not matter; a sequence of length 0 gives 0. Returned in
    ``out_dtype`` (default q's dtype; tests take float64)."""
    B, Hq, D, Hkv, Tmax = _check_decode(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    valid = torch.arange(Tmax, device=q.device)[None, :] < lengths.to(q.device).long()[:, None]  # (B, Tmax)
    k = torch.where(valid[:, None, :, None], kv_dequant(k_codes, k_scale, k_zero), 0.0).to(dtype)
    v = torch.where(valid[:, None, :, None], kv_dequant(v_codes, v_scale, v_zero), 0.0).to(dtype)
    s = torch.einsum("bkgd,bktd->bkgt", q.to(dtype).view(B, Hkv, Hq // Hkv, D), k) * sm_scale
    p = torch.softmax(s.masked_fill(~valid[:, None, None, :], -math.inf), dim=-1).nan_to_num(0.0)
    return torch.einsum("bkgt,bktd->bkgd", p, v).reshape(B, Hq, D).to(out_dtype or q.dtype)


# ---- checking wrappers ---------------------------------------------------------------------------------------


def _check_rows(x: torch.Tensor, name: str) -> tuple[int, int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"{name} must be (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} must be fp16/bf16/fp32, got {x.dtype}")
    if x.shape[-1] % 2:
        raise ValueError(f"head_dim must be even (two codes per byte, rotate_half), got {x.shape[-1]}")
    return tuple(x.shape)


def _rope_table(t: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """cos or sin, (T, D) or (B | 1, T, D) → (B | 1, T, D) in k's dtype and device (what the layer multiplies by)."""
    B, _, T, D = k.shape
    t = t.unsqueeze(0) if t.dim() == 2 else t
    if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (T, D):
        raise ValueError(f"cos/sin must be ({T}, {D}) or ({B}, {T}, {D}), got {tuple(t.shape)}")
    return t.to(device=k.device, dtype=k.dtype)


def _check_decode(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths):
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q must be (batch, heads, head_dim) fp16/bf16/fp32, got {tuple(q.shape)} {q.dtype}")
    B, Hq, D = q.shape
    if k_codes.dim() != 4 or k_codes.dtype != torch.uint8 or k_codes.shape[0] != B or k_codes.shape[3] * 2 != D:
        raise ValueError(f"k_codes must be ({B}, Hkv, Tmax, {D // 2}) uint8, "
                         f"got {tuple(k_codes.shape)} {k_codes.dtype}")
    Hkv, Tmax = k_codes.shape[1], k_codes.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} must be a multiple of kv heads {Hkv}")
    if v_codes.shape != k_codes.shape or v_codes.dtype != torch.uint8:
        raise ValueError(f"v_codes must match k_codes {tuple(k_codes.shape)}, got {tuple(v_codes.shape)}")
    for name, t in (("k_scale", k_scale), ("k_zero", k_zero), ("v_scale", v_scale), ("v_zero", v_zero)):
        if tuple(t.shape) != (B, Hkv, Tmax) or t.dtype != torch.float32:
            raise ValueError(f"{name} must be ({B}, {Hkv}, {Tmax}) fp32, got {tuple(t.shape)} {t.dtype}")
    if tuple(lengths.shape) != (B,):
        raise ValueError(f"lengths must be ({B},), got {tuple(lengths.shape)}")
    return B, Hq, D, Hkv, Tmax


def _pack_out(x: torch.Tensor, out, at=None):
    """out, checked against x (B, H, T, D): (B, H, T, …) tensors, or with `at` (B, H, T_out ≥ 0, …), written from
    token at[0] on; None allocates them."""
    B, H, T, D = x.shape
    if out is None:
        if at is not None:
            raise ValueError("at= needs out= (the cache it writes into)")
        return (torch.empty(B, H, T, D // 2, dtype=torch.uint8, device=x.device),
                torch.empty(B, H, T, dtype=torch.float32, device=x.device),
                torch.empty(B, H, T, dtype=torch.float32, device=x.device))
    codes, scale, zero = out
    T_out = codes.shape[2] if at is not None and codes.dim() == 4 else T
    if tuple(codes.shape) != (B, H, T_out, D // 2) or codes.dtype != torch.uint8 or codes.stride(-1) != 1:
        raise ValueError(f"out codes must be ({B}, {H}, {T_out}, {D // 2}) uint8 with unit last stride")
    if tuple(scale.shape) != (B, H, T_out) or scale.dtype != torch.float32 or zero.shape != scale.shape \
            or zero.dtype != torch.float32 or zero.stride() != scale.stride():
        raise ValueError(f"out scale / zero must be ({B}, {H}, {T_out}) fp32 with equal strides")
    if at is not None and (not isinstance(at, torch.Tensor) or at.numel() != 1 or at.dtype.is_floating_point
                           or at.device != x.device):
        raise ValueError(f"at must be a one-element integer tensor on {x.device}, got {at!r}")
    return codes, scale, zero


def _pack_config(n_rows: int, transform: bool, device: torch.device, config: dict | None) -> dict:
    """Launch settings of _kv_pack_kernel. With a transform: 64 rows per step (Tk, 64 KB in fp32 at D = 128, is
    re-read from L2 once per step) once there are enough rows to fill the GPU, else 16 (decode: more programs);
    16-deep K chunks and 8 warps (triton 3.6, sm_90, D = 128: ≤ 128 registers, no spills, 17–53 KB of shared
    memory). Without one: 32 rows, 8 warps (64–76 registers, 2 KB)."""
    if transform:
        many = device.type == "cuda" and n_rows >= 64 * _sm_count(device)
        cfg = {"rows": 64 if many else 16, "block_k": 16, "num_warps": 8}
    else:
        cfg = {"rows": 32, "block_k": 16, "num_warps": 8}  # 4 warps: 80–128 registers, bf16 spilled 8 bytes
    return {**cfg, **(config or {})}


def _launch_pack(x, cos, sin, tk, clip, out, config=None, at=None, quant=True):
    """One _kv_pack_kernel launch: quantize (and RoPE / transform when cos / tk are given) x into out (from token
    at[0] on when `at` is given); quant=False: out is (y, y, y), y a (B, H, T, D) tensor the transformed rows go to."""
    B, H, T, D = x.shape
    codes, scale, zero = out
    n_rows = B * H * T
    if n_rows == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    rope = cos is not None
    if rope:
        cos, sin = _rope_table(cos, x), _rope_table(sin, x)
        if cos.stride() != sin.stride() or cos.stride(-1) != 1:
            cos, sin = cos.contiguous(), sin.contiguous()
        srb, srt = (cos.stride(0) if cos.shape[0] > 1 else 0), cos.stride(1)
    else:
        cos = sin = x
        srb = srt = 0
    if tk is not None:
        if tuple(tk.shape) != (D, D):
            raise ValueError(f"tk must be ({D}, {D}), got {tuple(tk.shape)}")
        tk = tk.to(device=x.device, dtype=torch.float32).contiguous()
    cfg = _pack_config(n_rows, tk is not None, x.device, config)
    blocks = cdiv(n_rows, cfg["rows"])
    grid = (min(blocks, 4 * _sm_count(x.device) if x.is_cuda else 4),)  # persistent over row blocks
    _kv_pack_kernel[grid](
        x, cos, sin, x if tk is None else tk, codes, scale, zero, scale if at is None else at,
        n_rows, H, T, codes.shape[2], D, float(clip),
        *x.stride()[:3], srb, srt, *codes.stride()[:3], *(scale.stride()[:3] if quant else (0, 0, 0)),
        BLOCK_D=max(16, next_pow2(D)), ROWS=cfg["rows"], BLOCK_K=cfg["block_k"], ROPE=rope,
        TRANSFORM=tk is not None, EXACT=x.is_cuda, BF16_RNE=not x.is_cuda and x.dtype == torch.bfloat16,
        AT=at is not None, QUANT=quant, num_warps=cfg["num_warps"],
    )
    return codes, scale, zero


def kv_quant_pack(x: torch.Tensor, clip: float = 1.0, out=None, config: dict | None = None, at=None):
    """Quantize and pack a V (or already transformed K) block for the cache: one read, a 4 + 64/D-bit write.

    x: (B, H, T, D) fp16/bf16/fp32 (any strides, last dim contiguous), D even; clip: LAC clip ratio in (0, 1].
    out: optional (codes, scale, zero) to write into, e.g. a slice cache[:, :, p:p + T] of a preallocated cache.
    at: optional one-element integer tensor on x's device: out is then a whole cache (B, H, capacity, …) and x
    goes to tokens at[0] … at[0] + T − 1 of it; the position is read on the device (a CUDA graph replays the write
    wherever at points by then) and tokens past the capacity are dropped.
    config: optional launch settings {"rows", "block_k", "num_warps"} (defaults: ``_pack_config``).
    Returns codes (B, H, T, D/2) uint8, scale (B, H, T) fp32, zero (B, H, T) fp32 (integer-valued, 0..15)
    (with `at`, the whole out); equal to ``kv_quant_pack_ref`` bit for bit. Falls back to it where Triton cannot run.
    """
    _check_rows(x, "x")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    out = _pack_out(x, out, at)
    if not use_triton(x):
        return _copy_into(out, kv_quant_pack_ref(x, clip), at)
    return _launch_pack(x, None, None, None, clip, out, config, at)


def rope_k_quant_pack(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tk: torch.Tensor | None = None,
                      clip: float = 1.0, out=None, config: dict | None = None, at=None):
    """The fused write of the K cache: RoPE, the learned K transform and the 4-bit quantizer in one kernel.

    k: (B, H, T, D) fp16/bf16/fp32 before RoPE (any strides, last dim contiguous); cos, sin: (T, D) or (B, T, D),
    as transformers' rotary embedding returns them (cast to k's dtype, as the layer does); tk: (D, D), used in
    fp32 (the caller multiplies q by Tk⁻ᵀ), or None for no transform; clip, out, config, at: as ``kv_quant_pack``.
    RoPE is rounded to k's dtype and y = rope(k)·tk held in fp32 before quantization (module docstring).
    Returns (codes, scale, zero) as ``kv_quant_pack``. Codes equal ``rope_k_quant_pack_ref``'s except where
    y/scale lies within ~1e-6 of a rounding boundary (the fp32 sums of the product run in another order).
    Falls back to the reference where Triton cannot run.
    """
    _check_rows(k, "k")
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    out = _pack_out(k, out, at)
    if not use_triton(k):
        return _copy_into(out, rope_k_quant_pack_ref(k, cos, sin, tk, clip), at)
    return _launch_pack(k, cos, sin, tk, clip, out, config, at)


def rope_transform_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       t: torch.Tensor | None = None) -> torch.Tensor:
    """PyTorch reference of ``rope_transform``: ``rope_k_transform_ref`` rounded to x's dtype."""
    return rope_k_transform_ref(x, cos, sin, t).to(x.dtype)


def rope_transform(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, t: torch.Tensor | None = None,
                   config: dict | None = None) -> torch.Tensor:
    """The query side of ``rope_k_quant_pack``: RoPE and a (D, D) transform in one kernel, nothing quantized.

    x: (B, H, T, D) fp16/bf16/fp32 before RoPE (any strides, last dim contiguous); cos, sin: (T, D) or (B, T, D);
    t: (D, D), used in fp32 (the layer passes Tk⁻ᵀ for queries), or None. Returns a new contiguous (B, H, T, D)
    tensor in x's dtype: RoPE rounded to x's dtype as the layer computes it, the product summed in fp32 and
    rounded once; equal to ``rope_transform_ref`` but for the order of that sum (a last-bit difference where the
    sum lies at a rounding boundary). Falls back to the reference where Triton cannot run."""
    _check_rows(x, "x")
    if not use_triton(x):
        return rope_transform_ref(x, cos, sin, t)
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch_pack(x, cos, sin, t, 1.0, (y, y, y), config, quant=False)
    return y


def rope_qkv_write(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   tq: torch.Tensor | None, tk: torch.Tensor | None, k_clip: float, v_clip: float, k_out, v_out,
                   at: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """A decode step's attention inputs at the cache in one launch: ``rope_transform(q, cos, sin, tq)`` (returned),
    ``rope_k_quant_pack(k, cos, sin, tk, k_clip, out=k_out, at=at)`` and ``kv_quant_pack(v, v_clip, out=v_out,
    at=at)``, each computed as those functions compute it (the same kernel code, bit for bit), by programs side by
    side instead of three launches one after another.

    q: (B, Hq, T, D), k, v: (B, Hkv, T, D) before RoPE, any strides with the last dim contiguous; cos, sin as
    ``rope_k_quant_pack``; k_out, v_out: whole caches (codes, scale, zero) written from token at[0] on.
    config: ``_pack_config`` overrides for all three ({"rows", "block_k", "num_warps"}; "rows" then sets each).
    Runs the three functions where Triton cannot run, or where the two caches' strides differ."""
    B, Hq, T, D = _check_rows(q, "q")
    _check_rows(k, "k"), _check_rows(v, "v")
    Hkv = k.shape[1]
    if tuple(k.shape) != (B, Hkv, T, D) or tuple(v.shape) != (B, Hkv, T, D):
        raise ValueError(f"k and v must be ({B}, kv_heads, {T}, {D}) alike, got {tuple(k.shape)}, {tuple(v.shape)}")
    for clip in (k_clip, v_clip):
        if not 0.0 < clip <= 1.0:
            raise ValueError(f"clip must be in (0, 1], got {clip}")
    if at is None or k_out is None or v_out is None:
        raise ValueError("rope_qkv_write writes into caches: give k_out, v_out and at (their write position)")
    k_out, v_out = _pack_out(k, k_out, at), _pack_out(v, v_out, at)
    same = all(a.shape == b.shape and a.stride() == b.stride() for a, b in zip(k_out, v_out))
    if not use_triton(q) or not same:
        rope_k_quant_pack(k, cos, sin, tk, k_clip, out=k_out, at=at)
        kv_quant_pack(v, v_clip, out=v_out, at=at)
        return rope_transform(q, cos, sin, tq)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    cos, sin = _rope_table(cos, k), _rope_table(sin, k)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    mats = []
    for t in (tq, tk):
        if t is not None and tuple(t.shape) != (D, D):
            raise ValueError(f"the transforms must be ({D}, {D}), got {tuple(t.shape)}")
        mats.append(None if t is None else t.to(device=q.device, dtype=torch.float32).contiguous())
    tq, tk = mats
    y = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    nq, nkv = B * Hq * T, B * Hkv * T
    if nq == 0:
        return y
    cq, ck, cv = (_pack_config(n, t is not None, q.device, config) for n, t in ((nq, tq), (nkv, tk), (nkv, None)))
    cap = 4 * _sm_count(q.device) if q.is_cuda else 4
    pq, pk, pv = (min(cdiv(n, c["rows"]), cap) for n, c in ((nq, cq), (nkv, ck), (nkv, cv)))
    kc, ks, kz = k_out
    vc, vs, vz = v_out
    _qkv_write_kernel[(pq + pk + pv,)](
        q, q if tq is None else tq, y, k, k if tk is None else tk, kc, ks, kz, v, vc, vs, vz, cos, sin, at,
        nq, nkv, Hq, Hkv, T, kc.shape[2], D, float(k_clip), float(v_clip), pq, pk,
        *q.stride()[:3], *y.stride()[:3], *k.stride()[:3], *v.stride()[:3],
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), *kc.stride()[:3], *ks.stride()[:3],
        BLOCK_D=max(16, next_pow2(D)), ROWS_Q=cq["rows"], ROWS_K=ck["rows"], ROWS_V=cv["rows"],
        BLOCK_K=cq["block_k"], TQ=tq is not None, TK=tk is not None, EXACT=q.is_cuda,
        BF16_RNE=not q.is_cuda and q.dtype == torch.bfloat16, num_warps=cq["num_warps"],
    )
    return y


def _copy_into(out, res, at=None):
    """Copy the reference's result into out, from token at[0] on (as the kernel: only what fits)."""
    if at is None:
        window = slice(None)
    else:
        start = int(at.reshape(()))  # the reference runs where no graph is captured: reading it is fine
        window = slice(max(start, 0), max(start + res[0].shape[2], 0))
        if start < 0:
            res = tuple(r[:, :, -start:] for r in res)
    for o, r in zip(out, res):
        dst = o[:, :, window]
        dst.copy_(r[:, :, : dst.shape[2]])
    return out


# Long decodes run one warp a program, 32 tokens a step, 3 stages. H200, `--only decode` at the old → these defaults
# (results/bench/NVIDIA_H200_decode_attention.md; the tile and chunk sweeps: NOTES.md): batch 64 × 2100 tokens
# 166 → 103 µs, 32 × 2100 82 → 60, 8 × 8244 99 → 59, 32 × 8244 278 → 193; where few programs each take few steps
# (1 × 2100, 8 × 2100) one warp was slower (10.2 → 14.2, 27.9 → 29.4 µs) and they keep 4 warps. Such a program
# needs 255 registers, so 8 fit an SM (no cross-warp reductions: 5 bar.sync a step against 21 at 4 warps).
_ONE_WARP = {"block_n": 32, "num_warps": 1, "num_stages": 3}
_ONE_WARP_PER_SM = 8
_ONE_WARP_MIN_CHUNK = 256
_ONE_WARP_MIN_PROGRAMS = 12  # per SM, counting 256-token chunks: below it the 4-warp tiles were as fast or faster


def _decode_config(G: int, D: int, config: dict | None, B: int = 1, Hkv: int = 1, Tmax: int = 0,
                   device: torch.device | None = None, dtype: torch.dtype = torch.float16) -> dict:
    """Tiles of _decode_split_kernel: all G query heads of a kv head, padded to the 16 rows a tensor-core product
    needs, BLOCK_N tokens per step (tensor cores want ≥ 16); "pv": the P·V weights in two bf16 parts ("bf16", on the
    GPU) or two tf32 parts ("tf32"; what the CPU interpreter always runs). On a GPU, a decode of fp16/bf16 queries
    with at least ``_ONE_WARP_MIN_PROGRAMS`` 256-token chunks an SM over its B·Hkv sequence-heads takes ``_ONE_WARP``
    tiles unless ``config`` sets any of block_n, num_warps, num_stages (fp32 queries' three tf32 parts spill at one
    warp); anything else takes 64 tokens × 4 warps × 2 stages."""
    block_g, block_dh = max(16, next_pow2(G)), max(16, next_pow2(D // 2))
    cfg = {"block_n": 64, "chunk": None, "num_warps": 4, "num_stages": 2, "pv": "bf16"}
    if (device is not None and device.type == "cuda" and dtype != torch.float32
            and not {"block_n", "num_warps", "num_stages"} & set(config or {})
            and B * Hkv * cdiv(Tmax, _ONE_WARP_MIN_CHUNK) >= _ONE_WARP_MIN_PROGRAMS * _sm_count(device)):
        cfg.update(_ONE_WARP)
    cfg.update(config or {})
    if cfg["block_n"] < 16 or cfg["block_n"] & (cfg["block_n"] - 1):
        raise ValueError(f"block_n must be a power of two ≥ 16, got {cfg['block_n']}")
    if cfg["pv"] not in ("bf16", "tf32"):
        raise ValueError(f"pv must be 'bf16' or 'tf32', got {cfg['pv']!r}")
    return {**cfg, "block_g": block_g, "block_dh": block_dh}


def _decode_chunk(B: int, Hkv: int, Tmax: int, block_n: int, device: torch.device, chunk: int | None,
                  num_warps: int = 4) -> int:
    """Tokens per program. 4 warps: enough programs to fill the GPU (≈ 4 per SM over B·Hkv sequence-heads), at
    least 128 tokens each (so a partial, 4·D·G bytes, stays small next to the ≥ 18 KB of cache a program reads).
    1 warp: at most one wave of ``_ONE_WARP_PER_SM`` programs an SM, at least 256 tokens each (a wave and a few
    programs more took twice a wave's time on the H200). Both at most MAX_SPLITS partials per sequence-head; a
    multiple of block_n. Set from the capacity Tmax, not from lengths, which live on the device (reading them
    would synchronise and break CUDA graphs)."""
    if chunk is None:
        sms = _sm_count(device) if device.type == "cuda" else 2
        if num_warps == 1:
            chunk = max(_ONE_WARP_MIN_CHUNK, cdiv(Tmax, max(1, _ONE_WARP_PER_SM * sms // (B * Hkv))))
        else:
            chunk = max(128, cdiv(Tmax, cdiv(4 * sms, B * Hkv)))
    chunk = max(chunk, cdiv(Tmax, MAX_SPLITS), 1)
    return cdiv(chunk, block_n) * block_n


def decode_attention(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, sm_scale=None, out=None,
                     config: dict | None = None) -> torch.Tensor:
    """Attention of one new query per sequence over a packed 4-bit K/V cache (flash decoding).

    q: (B, Hq, D) fp16/bf16/fp32 (already RoPE'd and multiplied by Tk⁻ᵀ); k_codes, v_codes: (B, Hkv, Tmax, D/2)
    uint8 and k_scale, k_zero, v_scale, v_zero: (B, Hkv, Tmax) fp32, as ``kv_quant_pack`` writes them, Hq a
    multiple of Hkv (grouped-query attention: query head i reads kv head i // (Hq / Hkv)); lengths: (B,) int valid
    tokens per sequence (positions ≥ length are never read; 0 gives 0; clamped to [0, Tmax] on the device, as the
    reference's mask does, so that no value of lengths reads outside the cache); sm_scale: default 1/√D;
    out: optional (B, Hq, D) buffer in q's dtype, last dim contiguous; config: {"block_n", "chunk", "num_warps",
    "num_stages", "pv"} (``_decode_config``). Returns (B, Hq, D) in q's dtype. K/V are the values of ``kv_dequant`` (zeros must be integers,
    as ``kv_quant_pack`` writes them); the products are exact up to the tensor cores' fp32 sums and the split of
    P·V's weights (2^-18 relative in bf16 parts, 2^-21 in tf32), softmax runs in fp32. When the sequence is split (Tmax > chunk) a second kernel merges the
    partials. Falls back to ``decode_attention_ref`` where Triton cannot run.
    """
    B, Hq, D, Hkv, Tmax = _check_decode(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    if out is None:
        out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (B, Hq, D) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be ({B}, {Hq}, {D}) {q.dtype} with unit last stride")
    if not use_triton(q):
        return out.copy_(decode_attention_ref(q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, lengths, sm_scale))
    if B == 0 or Hq == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    if k_codes.stride() != v_codes.stride() or k_codes.stride(-1) != 1:
        k_codes, v_codes = k_codes.contiguous(), v_codes.contiguous()
    scales = (k_scale, k_zero, v_scale, v_zero)
    if any(t.stride() != k_scale.stride() for t in scales):
        scales = tuple(t.contiguous() for t in scales)
    lengths = lengths.to(device=q.device, dtype=torch.int32).contiguous()
    G = Hq // Hkv
    cfg = _decode_config(G, D, config, B, Hkv, Tmax, q.device, q.dtype)
    block_g, block_dh, block_n = cfg["block_g"], cfg["block_dh"], cfg["block_n"]
    chunk = _decode_chunk(B, Hkv, Tmax, block_n, q.device, cfg["chunk"], cfg["num_warps"])
    n_splits = cdiv(max(Tmax, 1), chunk)
    split = n_splits > 1
    if split:
        work = torch.empty(B, Hq, n_splits, D, dtype=torch.float32, device=q.device)
        m = torch.empty(B, Hq, n_splits, dtype=torch.float32, device=q.device)
        l_sum = torch.empty_like(m)
    else:
        work, m, l_sum = out, out, out
    bf16_rne = not q.is_cuda and q.dtype == torch.bfloat16
    # q's own 16-bit products on tensor cores; fp32 q (and bf16 in the CPU interpreter, whose dot cannot take it)
    # through the exact tf32 split
    qkind = {torch.float16: 1, torch.bfloat16: 2 if q.is_cuda else 0, torch.float32: 0}[q.dtype]
    _decode_split_kernel[(n_splits, B * Hkv)](
        q, k_codes, scales[0], scales[1], v_codes, scales[2], scales[3], lengths, work, m, l_sum,
        Hkv, G, D, Tmax, chunk, n_splits, sm_scale,
        q.stride(0), q.stride(1), *k_codes.stride()[:3], *scales[0].stride(), out.stride(0), out.stride(1),
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_DH=block_dh, SPLIT=split, BF16_RNE=bf16_rne, QKIND=qkind,
        PV_BF16=cfg["pv"] == "bf16" and q.is_cuda, ASM=q.is_cuda,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split:
        _decode_merge_kernel[(B * Hq,)](
            work, m, l_sum, lengths, out, Hq, D, Tmax, chunk, n_splits, out.stride(0), out.stride(1),
            BLOCK_S=next_pow2(n_splits), BLOCK_D=max(16, next_pow2(D)), BF16_RNE=bf16_rne,
            num_warps=4,
        )
    return out


def bench_decode_attention(B: int = 1, Hq: int = 32, Hkv: int = 8, T: int = 8192, D: int = 128,
                           dtype: torch.dtype = torch.float16, configs=(None,), check: bool = False) -> list[dict]:
    """GPU time of ``decode_attention`` (CUDA-graph replay, median) and the cache bandwidth it reaches, against
    fp16 SDPA (``F.scaled_dot_product_attention(enable_gqa=True)``, what the fp16 model runs) over a cache of the
    same shape in q's dtype, timed once in the same call. One row per config of ``configs`` (None: the wrapper's
    own), with that config's keys, all over the same cache; with ``check`` each row also has err_over_tol, the largest error against the
    float64 reference over the tests' tolerance (1e-5·max|V| + half an ulp of q's dtype of the output; ≤ 1 passes).
    A config that fails to run gives no row (its error is logged), so that one cannot hide the others."""
    import triton.testing

    x = torch.randn(B, Hkv, T, D, device="cuda", dtype=dtype)
    cache = (*kv_quant_pack(x), *kv_quant_pack(x.flip(2)))
    q = torch.randn(B, Hq, D, device="cuda", dtype=dtype)
    lengths = torch.full((B,), T, dtype=torch.int32, device="cuda")
    cache_bytes = 2 * (cache[0].numel() + 8 * cache[1].numel())
    v = x.flip(2).contiguous()
    q4 = q.unsqueeze(2)
    sdpa_ms = triton.testing.do_bench_cudagraph(
        lambda: torch.nn.functional.scaled_dot_product_attention(q4, x, v, enable_gqa=True))
    del x, v, q4
    if check:
        ref = decode_attention_ref(q, *cache, lengths, out_dtype=torch.float64)
        half_ulp = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[dtype]
        tol = 1e-5 * float(kv_dequant(*cache[3:]).abs().max()) + half_ulp * ref.abs()
    rows = []
    for config in configs:
        o = torch.full_like(q, math.nan)
        try:
            decode_attention(q, *cache, lengths, out=o, config=config)
            row = {"B": B, "Hq": Hq, "Hkv": Hkv, "T": T, "D": D, **(config or {})}
            if check:
                row["err_over_tol"] = float(((o.double() - ref).abs() / tol).nan_to_num(math.inf).max())
            ms = triton.testing.do_bench_cudagraph(lambda: decode_attention(q, *cache, lengths, out=o, config=config))
        except Exception as e:  # a config that does not compile must not stop the others
            print(f"decode_attention B={B} T={T} {config} failed: {type(e).__name__}: {str(e)[-200:]}", flush=True)
            continue
        rows.append({**row, "us": 1e3 * ms, "cache_GBps": cache_bytes / ms / 1e6, "fp16_sdpa_us": 1e3 * sdpa_ms,
                     "vs_fp16_sdpa": sdpa_ms / ms})
    return rows
