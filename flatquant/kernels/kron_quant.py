"""Fused Kronecker transform + per-token 4-bit activation quantization (FlatQuant, arXiv 2410.09426 §3.1).

Usage::

    from flatquant.kernels.kron_quant import kron_quant
    q, scale, zero = kron_quant(x, L, R, clip=0.9, sym=True)    # x: (tokens, n1*n2) fp16

For every token the row x (length n1*n2) is viewed as X_t (n1, n2) row-major and transformed to
Y = Lᵀ·X_t·R, which equals x·(L⊗R) flattened. Y is quantized per token to 4 bits and packed two values per
byte as two's-complement nibbles (low nibble = even column; ``flatquant.packing.pack_int4_twos``). One
kernel reads x once and writes 4 bits per value, so the transform costs two small tensor-core products per
token instead of a pass over device memory for each step.

Numerics (the kernel and ``kron_quant_ref`` agree on them): T = X_t·R accumulates in fp32 and is rounded
to x's dtype (as any tensor-core pipeline of two products does); Y = Lᵀ·T accumulates in fp32; the
quantizer works in fp32 and rounds half to even (torch.round).

- symmetric:  scale = clip·max|y| / 7,                 q = clamp(round(y/scale), -8, 7)
- asymmetric: scale = (clip·max y - clip·min y) / 15,  zero = round(-clip·min y / scale),
              q = clamp(round(y/scale) + zero, 0, 15)
A token whose scale would be 0 gets scale 1 (all its q are then 0, or zero for asym).
"""
from __future__ import annotations

import os

import torch

from flatquant.packing import pack_e4m3, pack_int4_twos

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Triton decides at @triton.jit time whether a kernel is compiled or interpreted, and its own library
# functions (tl.max, ...) when triton is first imported: interpreted kernels need both.
JIT_INTERPRETED = HAS_TRITON and interpreting() and type(tl.max).__name__ == "InterpretedFunction"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on tensor ``t``: CUDA tensors with compiled kernels, CPU tensors
    with kernels defined under TRITON_INTERPRET=1."""
    if not HAS_TRITON:
        return False
    return t.device.type == "cpu" if JIT_INTERPRETED else t.is_cuda


if HAS_TRITON:
    # 1.5·2^23: adding and subtracting it rounds an fp32 |v| < 2^22 to the nearest integer, ties to even
    # (what torch.round does; the interpreter has no libdevice.rint).
    _ROUND_MAGIC = tl.constexpr(12582912.0)

    @triton.jit
    def _rne_bf16(v):
        """fp32 v rounded to the nearest bf16 (ties to even), as fp32: the interpreter truncates fp32 → bf16, so
        the kernels do it by hand there."""
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _swiglu(g, u, BF16_RNE: tl.constexpr = False):
        """SwiGLU's product of a gate and an up tile: silu(g) rounded to u's dtype (as torch's F.silu on 16-bit
        inputs), times u in fp32, rounded to u's dtype. fused.silu_mul and kron_quant(glu=True) both use it, so
        that the transform of the fused product equals the transform of silu_mul's output bit for bit. BF16_RNE:
        round to bf16 by hand (the interpreter truncates)."""
        g = g.to(tl.float32)
        s = g / (1.0 + tl.exp(-g))
        if BF16_RNE and u.dtype == tl.bfloat16:
            return _rne_bf16(_rne_bf16(s) * u.to(tl.float32)).to(u.dtype)
        s = s.to(u.dtype)
        return (s.to(tl.float32) * u.to(tl.float32)).to(u.dtype)

    @triton.jit
    def _kron_tile(x, lt, r, DOT_F32: tl.constexpr, R_EYE: tl.constexpr = False):
        """Lᵀ·(X_t·R) in fp32; X_t·R is rounded to x's dtype in between (fp32 operands in the interpreter).
        R_EYE: R is the identity, so X_t·R rounded is X_t itself and only Lᵀ·X_t runs (r is not read)."""
        if R_EYE:
            t = x.to(lt.dtype)
        else:
            t = tl.dot(x.to(r.dtype), r, input_precision="ieee" if DOT_F32 else None)
            if DOT_F32 and x.dtype == tl.bfloat16:
                t = _rne_bf16(t)  # the interpreter truncates fp32 → bf16
            t = t.to(x.dtype).to(r.dtype)
        return tl.dot(lt, t, input_precision="ieee" if DOT_F32 else None)

    @triton.jit
    def _scale_zero(ymax, ymin, clip, SYM: tl.constexpr):
        """Per-token scale and zero point from the (unclipped) max and min of y."""
        if SYM:
            scale = clip * tl.maximum(ymax, -ymin) / 7.0
            scale = tl.where(scale > 0.0, scale, 1.0)
            zero = scale * 0.0
        else:
            scale = (clip * ymax - clip * ymin) / 15.0
            scale = tl.where(scale > 0.0, scale, 1.0)
            zero = (-clip * ymin / scale + _ROUND_MAGIC) - _ROUND_MAGIC
        return scale, zero

    @triton.jit
    def _token_stats(y, valid, TOKENS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                     SYM: tl.constexpr = False):
        """Max and min of y over each token's rows (padding excluded): (TOKENS,) each. SYM: (max|y|, −max|y|)
        instead, which gives the symmetric scale the same value (max(max y, −min y) = max|y|) from one
        reduction across the warps, not two."""
        if SYM:
            a = tl.max(tl.reshape(tl.where(valid, tl.abs(y), 0.0), (TOKENS, ROWS * COLS)), axis=1)
            return a, -a
        hi = tl.reshape(tl.where(valid, y, -float("inf")), (TOKENS, ROWS * COLS))
        lo = tl.reshape(tl.where(valid, y, float("inf")), (TOKENS, ROWS * COLS))
        return tl.max(hi, axis=1), tl.min(lo, axis=1)

    @triton.jit
    def _per_row(v, TOKENS: tl.constexpr, ROWS: tl.constexpr):
        """(TOKENS,) → (TOKENS*ROWS,): each token's value repeated over its rows."""
        return tl.reshape(tl.broadcast_to(v[:, None], (TOKENS, ROWS)), (TOKENS * ROWS,))

    @triton.jit
    def _quant_store(y, scale, zero, q_ptrs, qmask, ROWS: tl.constexpr, COLS: tl.constexpr, SYM: tl.constexpr,
                     E4M3: tl.constexpr = False):
        """Round y/scale (+zero) per row, clamp to 4 bits, pack column pairs (low nibble = even column); E4M3
        (symmetric only): one byte a code instead, the e4m3fn encoding of q·2^-9 (``packing.pack_e4m3``)."""
        v = y / scale[:, None]
        v = (v + _ROUND_MAGIC) - _ROUND_MAGIC + zero[:, None]
        if SYM:
            v = tl.minimum(tl.maximum(v, -8.0), 7.0)
        else:
            v = tl.minimum(tl.maximum(v, 0.0), 15.0)
        if E4M3:
            n = v.to(tl.int32)
            tl.store(q_ptrs, tl.where(n < 0, 128 - n, n).to(tl.uint8), mask=qmask)
        else:
            lo, hi = tl.split(tl.reshape(v.to(tl.int32), (ROWS, COLS // 2, 2)))
            tl.store(q_ptrs, ((lo & 15) | ((hi & 15) << 4)).to(tl.uint8), mask=qmask)

    @triton.jit
    def _rms_norm_tile(x, w, eps, n, TOKENS: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
                       BF16_RNE: tl.constexpr):
        """LlamaRMSNorm of each token's (ROWS, COLS) tile of x (n valid values, padding 0), as fused.rms_norm computes a
        row: fp32 statistics, the normalised value rounded to x's dtype, times w (already in x's dtype), rounded. The
        sum of squares runs in tile order, so a value can differ from fused.rms_norm's in its last bit."""
        h = x.to(tl.float32)
        ss = tl.sum(tl.reshape(h * h, (TOKENS, ROWS * COLS)), axis=1)
        h = h * _per_row(tl.rsqrt(ss / n + eps), TOKENS, ROWS)[:, None]
        if BF16_RNE and x.dtype == tl.bfloat16:  # the interpreter truncates fp32 → bf16
            return _rne_bf16(w.to(tl.float32) * _rne_bf16(h)).to(x.dtype)
        return (w.to(tl.float32) * h.to(x.dtype).to(tl.float32)).to(x.dtype)

    @triton.jit
    def _kron_quant_kernel(
        x_ptr, l_ptr, r_ptr, q_ptr, scale_ptr, zero_ptr,
        M, N1, N2, clip,
        stride_xm, stride_qm,
        BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_J: tl.constexpr, TOKENS: tl.constexpr,
        SYM: tl.constexpr, DOT_F32: tl.constexpr, E4M3: tl.constexpr, R_EYE: tl.constexpr, GLU: tl.constexpr,
        nw_ptr=None, norm_eps=0.0, NORM: tl.constexpr = False,
    ):
        """Persistent: ``_kron_quant_blocks`` from program_id on, num_programs apart."""
        _kron_quant_blocks(tl.program_id(0), tl.num_programs(0), x_ptr, l_ptr, r_ptr, q_ptr, scale_ptr, zero_ptr,
                           M, N1, N2, clip, stride_xm, stride_qm, BLOCK_N1, BLOCK_N2, BLOCK_J, TOKENS, SYM, DOT_F32,
                           None, E4M3, R_EYE, GLU, nw_ptr, norm_eps, NORM)

    @triton.jit
    def _kron_quant_blocks(
        pid, nprog, x_ptr, l_ptr, r_ptr, q_ptr, scale_ptr, zero_ptr,
        M, N1, N2, clip,
        stride_xm, stride_qm,
        BLOCK_N1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_J: tl.constexpr, TOKENS: tl.constexpr,
        SYM: tl.constexpr, DOT_F32: tl.constexpr, STAGES: tl.constexpr = None, E4M3: tl.constexpr = False,
        R_EYE: tl.constexpr = False, GLU: tl.constexpr = False, nw_ptr=None, norm_eps=0.0,
        NORM: tl.constexpr = False,
    ):
        """Token blocks pid, pid + nprog, ... of TOKENS tokens each, stacked as
        (TOKENS·BLOCK_N1, BLOCK_N2) rows, so that X·R is one product and Lᵀ·T one product with a
        block-diagonal Lᵀ (more rows per tensor-core instruction, more work in flight per token chain).
        L (and R, when one column chunk covers it) are loaded once per program. With BLOCK_J < BLOCK_N2
        (large factors, whose R does not fit in shared memory) Y is made in column chunks twice: once for
        max/min, once to quantize. E4M3: codes one byte each (``_quant_store``), rows of N1·N2 bytes. R_EYE: R is
        the identity (r_ptr unread; one column chunk only): Y = Lᵀ·X_t, one product a step instead of two.
        GLU: a row of x is [gate | up], 2·N1·N2 wide, and X_t is ``_swiglu(gate, up)`` (SwiGLU's product made as
        it is loaded, so that it is never written out). NORM: x is a decoder layer's residual stream and X_t its
        RMSNorm with the weight at nw_ptr (N1·N2 values, any float dtype, rounded to x's) and norm_eps
        (``_rms_norm_tile``): the norm's kernel and its output's pass through memory saved."""
        NCHUNK: tl.constexpr = BLOCK_N2 // BLOCK_J
        tl.static_assert(NCHUNK == 1 or not R_EYE, "R_EYE takes one column chunk")
        PER_BYTE: tl.constexpr = 1 if E4M3 else 2
        RB: tl.constexpr = TOKENS * BLOCK_N1
        rr = tl.arange(0, RB)
        tok = rr // BLOCK_N1
        i1 = rr % BLOCK_N1
        m1 = i1 < N1
        i2 = tl.arange(0, BLOCK_N2)
        jj = tl.arange(0, BLOCK_J)
        jh = tl.arange(0, BLOCK_J // PER_BYTE)
        tt = tl.arange(0, TOKENS)
        qcols = N2 // PER_BYTE  # bytes of a factor row
        # ltb[a, b] = L[b, a] within a token's diagonal block; 0 elsewhere and in padding.
        lmask = m1[:, None] & m1[None, :] & (tok[:, None] == tok[None, :])
        ltb = tl.load(l_ptr + i1[None, :] * N1 + i1[:, None], mask=lmask, other=0.0)
        if DOT_F32:
            ltb = ltb.to(tl.float32)
        if R_EYE:
            r = ltb  # unused
        elif NCHUNK == 1:
            r = tl.load(r_ptr + i2[:, None] * N2 + i2[None, :], mask=(i2 < N2)[:, None] & (i2 < N2)[None, :],
                        other=0.0)
            if DOT_F32:
                r = r.to(tl.float32)
        if NORM:  # the norm's weight in the tiles' layout, in x's dtype, loaded once (padding 0)
            nw = tl.load(nw_ptr + (i1 * N2)[:, None] + i2[None, :], mask=m1[:, None] & (i2 < N2)[None, :],
                         other=0.0).to(tl.float32)
            if DOT_F32 and x_ptr.dtype.element_ty == tl.bfloat16:
                nw = _rne_bf16(nw)  # the interpreter truncates fp32 → bf16
            nw = nw.to(x_ptr.dtype.element_ty)
        for base in tl.range(pid * TOKENS, M, nprog * TOKENS, num_stages=STAGES):
            row0 = tl.cast(base, tl.int64)
            vrow = m1 & (base + tok < M)
            x_ptrs = x_ptr + (row0 + tok)[:, None] * stride_xm + (i1 * N2)[:, None] + i2[None, :]
            xmask = vrow[:, None] & (i2 < N2)[None, :]
            if GLU:
                u = tl.load(x_ptrs + N1 * N2, mask=xmask, other=0.0)
                x = _swiglu(tl.load(x_ptrs, mask=xmask, other=0.0), u, DOT_F32)  # DOT_F32 with bf16 x: the interpreter
            else:
                x = tl.load(x_ptrs, mask=xmask, other=0.0)
            if NORM:
                x = _rms_norm_tile(x, nw, norm_eps, N1 * N2, TOKENS, BLOCK_N1, BLOCK_N2, DOT_F32)
            q_row = q_ptr + (row0 + tok)[:, None] * stride_qm + (i1 * qcols)[:, None]
            if NCHUNK == 1:
                y = _kron_tile(x, ltb, r, DOT_F32, R_EYE)
                ymax, ymin = _token_stats(y, vrow[:, None] & (i2 < N2)[None, :], TOKENS, BLOCK_N1, BLOCK_N2, SYM)
                scale, zero = _scale_zero(ymax, ymin, clip, SYM)
                _quant_store(y, _per_row(scale, TOKENS, BLOCK_N1), _per_row(zero, TOKENS, BLOCK_N1),
                             q_row + jh[None, :], vrow[:, None] & (jh < qcols)[None, :], RB, BLOCK_J, SYM, E4M3)
            else:
                ymax = tl.full((TOKENS,), -float("inf"), tl.float32)
                ymin = tl.full((TOKENS,), float("inf"), tl.float32)
                for c in tl.static_range(NCHUNK):
                    cols = c * BLOCK_J + jj
                    rc = tl.load(r_ptr + i2[:, None] * N2 + cols[None, :],
                                 mask=(i2 < N2)[:, None] & (cols < N2)[None, :], other=0.0)
                    y = _kron_tile(x, ltb, rc.to(ltb.dtype), DOT_F32)
                    cmax, cmin = _token_stats(y, vrow[:, None] & (cols < N2)[None, :], TOKENS, BLOCK_N1, BLOCK_J,
                                              SYM)
                    ymax = tl.maximum(ymax, cmax)
                    ymin = tl.minimum(ymin, cmin)
                scale, zero = _scale_zero(ymax, ymin, clip, SYM)
                for c in tl.static_range(NCHUNK):
                    cols = c * BLOCK_J + jj
                    rc = tl.load(r_ptr + i2[:, None] * N2 + cols[None, :],
                                 mask=(i2 < N2)[:, None] & (cols < N2)[None, :], other=0.0)
                    y = _kron_tile(x, ltb, rc.to(ltb.dtype), DOT_F32)
                    hcols = c * (BLOCK_J // PER_BYTE) + jh
                    _quant_store(y, _per_row(scale, TOKENS, BLOCK_N1), _per_row(zero, TOKENS, BLOCK_N1),
                                 q_row + hcols[None, :], vrow[:, None] & (hcols < qcols)[None, :], RB, BLOCK_J, SYM,
                                 E4M3)
            tmask = base + tt < M
            tl.store(scale_ptr + row0 + tt, scale, mask=tmask)
            if not SYM:
                tl.store(zero_ptr + row0 + tt, zero, mask=tmask)


_SM_COUNT: dict = {}


def cdiv(x: int, y: int) -> int:
    """⌈x / y⌉ for host-side launch arithmetic: triton.cdiv's value without its constexpr-function call (a few µs a
    call, and the wrappers make about twenty per decoder layer and step)."""
    return (x + y - 1) // y


def next_pow2(n: int) -> int:
    """The smallest power of 2 ≥ n (n ≥ 1), as triton.next_power_of_2, as a plain function (see cdiv)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def padded_factors(n1: int, n2: int) -> tuple[int, int]:
    """The kernels' block sizes for n1 × n2 factors: powers of 2, at least 16 (L, tl.dot's minimum) and 32 (R)."""
    return max(16, next_pow2(n1)), max(32, next_pow2(n2))


def default_config(b1: int, b2: int, r_eye: bool = False) -> dict:
    """kron_quant's launch settings for padded factors b1 × b2 (``config`` overrides them); r_eye: R is None."""
    small = b1 * b2 <= 64 * 128
    # Narrow L (b1 < 64): stack tokens so Lᵀ·T fills a 64-row wgmma (measured 1375 vs 1128 GB/s, 32x128). Not
    # with R = I, where the one product a token is cheap and four programs an SM win (o_proj's 32x128, e4m3, 8192
    # tokens, H100: 0.0397 ms against 0.0424 stacking two; results/bench/NVIDIA_H100_80GB_HBM3_kron_sweep.json).
    stack = 64 // b1 if small and b1 < 64 and not r_eye else 1
    return {"num_warps": 4 if small else 8, "ctas_per_sm": (4 if stack == 1 else 2) if small else 2,
            "tokens": stack, "num_stages": 3, "block_j": b2 if b1 * b2 <= 128 * 128 else 64}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _check_inputs(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor | None, glu: bool = False) -> tuple[int, int]:
    """(n1, n2) of x's factors; R None stands for the identity of size (x's width) / n1; glu: x's rows are
    [gate | up], so the transformed width is half of x's."""
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, {'2*' if glu else ''}n1*n2), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16/bf16/fp32, got {x.dtype}")
    if glu and x.shape[1] % 2:
        raise ValueError(f"glu=True: x's rows are [gate | up], so its width must be even, got {x.shape[1]}")
    width = x.shape[1] // 2 if glu else x.shape[1]
    n1 = L.shape[0]
    if R is None and (L.dim() != 2 or width % n1):
        raise ValueError(f"R=None (identity): L must be square and divide the {width} columns, got "
                         f"{tuple(L.shape)}")
    n2 = width // n1 if R is None else R.shape[0]
    if L.shape != (n1, n1) or (R is not None and R.shape != (n2, n2)):
        raise ValueError(f"L, R must be square, got {tuple(L.shape)}, {None if R is None else tuple(R.shape)}")
    if n1 * n2 != width or n2 % 2:
        raise ValueError(f"{'half of ' if glu else ''}x has {width} columns, need n1*n2 = {n1}*{n2} with n2 even")
    return n1, n2


def kron_quant(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor | None, clip: float = 1.0, sym: bool = True,
               out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
               config: dict | None = None, codes: str = "int4", glu: bool = False,
               norm: tuple[torch.Tensor, float] | None = None):
    """Transform and quantize activations in one kernel.

    x: (tokens, n1*n2) fp16/bf16, last dim contiguous; L: (n1, n1); R: (n2, n2) (cast to x's dtype), or None for
    the identity (o_proj's head transform H ⊗ I): the same result as passing I, one product a token fewer;
    clip: LAC clip factor in (0, 1]; sym: symmetric (q in [-8, 7]) or asymmetric (q in [0, 15]).
    out: optional preallocated (q, scale, zero) to write into (the GPU check poisons them first).
    config: optional launch settings {"num_warps", "num_stages", "ctas_per_sm", "tokens", "block_j", "maxnreg"}
    (defaults by block size). tokens: tokens stacked per step (power of 2); block_j < padded n2 makes Y in
    column chunks, for factors whose R does not fit in shared memory (then tokens = 1).
    codes: "int4" or "e4m3" (symmetric only: one byte a code, the e4m3fn encoding of q·2^-9 that the fp8 GEMM
    reads, ``packing.pack_e4m3``).
    glu: x is (tokens, 2*n1*n2), rows [gate | up] (the up/gate GEMM's output), and the kernel transforms SwiGLU's
    product silu(gate)·up as it reads them (``swiglu_ref``; the same values as ``fused.silu_mul``'s), so that the
    product is never written out: down_proj's input in one pass instead of two.
    norm: (weight (n1*n2,), eps): x is the residual stream and the kernel transforms its LlamaRMSNorm
    (``rms_norm_ref``; fused.rms_norm's values up to the last bit of a few, its sum of squares running in another
    order), so that the norm needs no kernel of its own nor a pass through memory.
    Returns q: (tokens, n1*n2/2) uint8 packed (low nibble = even column) — e4m3: (tokens, n1*n2) uint8 —,
    scale: (tokens,) fp32, zero: (tokens,) fp32 integer-valued for asym, None for sym.
    Falls back to ``kron_quant_ref`` where Triton cannot run (no CUDA and no interpreter).
    """
    n1, n2 = _check_inputs(x, L, R, glu)
    _check_norm(norm, n1 * n2)
    if not 0.0 < clip <= 1.0:
        raise ValueError(f"clip must be in (0, 1], got {clip}")
    if codes not in ("int4", "e4m3"):
        raise ValueError(f"codes must be 'int4' or 'e4m3', got {codes!r}")
    e4m3 = codes == "e4m3"
    if e4m3 and not sym:
        raise ValueError("codes='e4m3' holds symmetric codes only (q in [-8, 7]); asymmetric ones need 'int4'")
    if not use_triton(x):
        return kron_quant_ref(x, L, R, clip, sym, codes=codes, glu=glu, norm=norm)
    if x.stride(1) != 1:
        x = x.contiguous()
    M = x.shape[0]
    L = L.to(device=x.device, dtype=x.dtype).contiguous()
    b1, b2 = padded_factors(n1, n2)
    r_eye = R is None and b1 * b2 <= 128 * 128  # larger ones need column chunks of a real R
    if R is None and not r_eye:
        R = torch.eye(n2, device=x.device, dtype=x.dtype)
    R = L if r_eye else R.to(device=x.device, dtype=x.dtype).contiguous()  # r_eye: a placeholder, never read
    if out is None:
        q = torch.empty(M, n1 * n2 // (1 if e4m3 else 2), dtype=torch.uint8, device=x.device)
        scale = torch.empty(M, dtype=torch.float32, device=x.device)
        zero = None if sym else torch.empty(M, dtype=torch.float32, device=x.device)
    else:
        q, scale, zero = out
    if M == 0:
        return q, scale, zero
    cfg = {**default_config(b1, b2, r_eye), **(config or {})}
    block_j = b2 if r_eye else min(cfg["block_j"], b2)
    tokens = cfg["tokens"] if block_j == b2 else 1
    if tokens > 1 and cfg["num_warps"] != 4:
        raise ValueError("tokens > 1 is validated with num_warps=4 only (wrong output seen with 8 on H100)")
    num_stages = cfg["num_stages"] if block_j == b2 else 1  # chunked R: pipelining buffers overflow smem
    grid_size = min(cdiv(M, tokens), _sm_count(x.device) * cfg["ctas_per_sm"] if x.is_cuda else 4)
    extra = {"maxnreg": cfg["maxnreg"]} if cfg.get("maxnreg") and x.is_cuda else {}
    _kron_quant_kernel[(grid_size,)](
        x, L, R, q, scale, scale if zero is None else zero,
        M, n1, n2, float(clip),
        x.stride(0), q.stride(0),
        BLOCK_N1=b1, BLOCK_N2=b2, BLOCK_J=block_j, TOKENS=tokens, SYM=sym,
        DOT_F32=not x.is_cuda or x.dtype == torch.float32, E4M3=e4m3, R_EYE=r_eye, GLU=glu, **norm_args(norm),
        num_warps=cfg["num_warps"], num_stages=num_stages, **extra,
    )
    return q, scale, zero


def quantize_per_token_ref(y: torch.Tensor, clip: float, sym: bool):
    """Per-token 4-bit quantizer in fp32. y: (tokens, k) fp32 → (q int32, scale fp32, zero fp32 | None)."""
    y = y.float()
    if sym:
        scale = clip * y.abs().amax(dim=1) / 7.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(y / scale[:, None]), -8, 7)
        return q.to(torch.int32), scale, None
    ymax = clip * y.amax(dim=1)
    ymin = clip * y.amin(dim=1)
    scale = (ymax - ymin) / 15.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-ymin / scale)
    q = torch.clamp(torch.round(y / scale[:, None]) + zero[:, None], 0, 15)
    return q.to(torch.int32), scale, zero


def kron_transform_ref(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor | None,
                       intermediate_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y = x·(L⊗R) per token in fp32 as Lᵀ·X_t·R. x: (tokens, n1*n2) → (tokens, n1*n2) fp32; R None: identity.

    intermediate_dtype: dtype X_t·R is rounded to before the product with Lᵀ (the kernel rounds to x's
    dtype, L and R being cast to it first); None keeps fp32 throughout and the factors as given.
    """
    n1 = L.shape[0]
    n2 = x.shape[1] // n1 if R is None else R.shape[0]
    if intermediate_dtype is not None:
        L = L.to(x.dtype)
        R = None if R is None else R.to(x.dtype)
    xt = x.float().reshape(-1, n1, n2)
    t = xt if R is None else xt @ R.float()
    if intermediate_dtype is not None:
        t = t.to(intermediate_dtype).float()
    return (L.float().T @ t).reshape(x.shape[0], n1 * n2)


def _check_norm(norm, width: int) -> None:
    if norm is None:
        return
    weight, eps = norm
    if weight.shape != (width,) or not weight.is_floating_point() or not eps >= 0:
        raise ValueError(f"norm must be (weight ({width},) float, eps ≥ 0), got {tuple(weight.shape)} {weight.dtype}, "
                         f"{eps}")


def norm_args(norm: tuple[torch.Tensor, float] | None, flag: str = "NORM") -> dict:
    """The kernels' arguments for an RMSNorm in front: ``_kron_quant_blocks``' NORM (flag "KQ_NORM" for the GEMM's
    one-launch form), nw_ptr and norm_eps."""
    if norm is None:
        return {flag: False}
    return {"nw_ptr": norm[0].contiguous(), "norm_eps": float(norm[1]), flag: True}


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm as transformers computes it: fp32 statistics, the row rounded to x's dtype, times the weight
    in x's dtype. The same as flatquant.quant_layer.rms_norm with the weight cast, restated because the kernels
    import no layer code (tests/test_packing.py::test_kernels_import_only_the_leaf)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(x.dtype) * h.to(x.dtype)


def swiglu_ref(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product as the kernels make it (``_swiglu``): x (..., 2k) rows [gate | up] → silu(gate)·up (..., k)
    in x's dtype, silu rounded to that dtype first (as F.silu on 16-bit inputs), the product in fp32 then rounded."""
    g, u = x.float().chunk(2, dim=-1)
    s = (g / (1.0 + torch.exp(-g))).to(x.dtype)
    return (s.float() * u).to(x.dtype)


def kron_quant_ref(x: torch.Tensor, L: torch.Tensor, R: torch.Tensor | None, clip: float = 1.0, sym: bool = True,
                   intermediate_dtype: torch.dtype | None = "input", return_float: bool = False,
                   codes: str = "int4", glu: bool = False, norm: tuple[torch.Tensor, float] | None = None):
    """Plain-PyTorch reference of ``kron_quant`` (same outputs).

    intermediate_dtype: "input" (default) rounds X_t·R to x's dtype as the kernel does; None keeps fp32.
    return_float: also return y/scale (+zero), the fp32 value that was rounded, for boundary-aware tests.
    codes: "int4" (packed two's-complement nibbles) or "e4m3" (symmetric: one e4m3fn byte a code).
    glu: x's rows are [gate | up]; their ``swiglu_ref`` is transformed. norm: (weight, eps): their ``rms_norm_ref``.
    """
    n1, n2 = _check_inputs(x, L, R, glu)
    _check_norm(norm, n1 * n2)
    if glu:
        x = swiglu_ref(x)
    if norm is not None:
        x = rms_norm_ref(x, *norm)
    inter = x.dtype if intermediate_dtype == "input" else intermediate_dtype
    y = kron_transform_ref(x, L, R, inter)
    q, scale, zero = quantize_per_token_ref(y, clip, sym)
    out = (pack_e4m3(q) if codes == "e4m3" else pack_int4_twos(q), scale, zero)
    if return_float:
        v = y / scale[:, None] + (0.0 if zero is None else zero[:, None])
        return out + (v,)
    return out
