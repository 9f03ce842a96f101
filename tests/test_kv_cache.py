"""4-bit K/V cache kernels (flatquant/kernels/kv_cache.py) against their PyTorch references, on irregular shapes.

Without CUDA the kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set here before triton is imported
(as in tests/test_kernels.py); if triton was imported earlier in this process, the interpreter tests run again in a
subprocess (test_interpreter_tests_in_subprocess). References always run on the CPU for the packed writes (the
kernels divide correctly rounded, as PyTorch's CPU kernels do; its CUDA kernels divide by a scalar as a·(1/b)).
"""
import importlib
import math
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if "flatquant.kernels.kv_cache" in sys.modules:
        importlib.reload(sys.modules["flatquant.kernels.kv_cache"])

from flatquant.kernels.kv_cache import (decode_attention, decode_attention_ref, kv_dequant, kv_quant_pack, rope_qkv_write,
                                        rope_transform, rope_transform_ref,
                                        kv_quant_pack_ref, rope_k_quant_pack, rope_k_quant_pack_ref,
                                        rope_k_transform_ref)
from flatquant.kernels import kv_cache as kv_kernels
from flatquant.packing import unpack_int4_offset
from flatquant.quantizers import QuantSpec, fake_quant
from kernel_helpers import (DEVICE, gpu, needs_cuda, needs_rerun, needs_triton, rerun_under_interpreter,
                            run_without_triton)

N_INTERPRETER_TESTS = 79  # the tests that need triton (at least these pass in the subprocess)


def _rows(B, H, T, D, dtype, seed, device=DEVICE):
    """(B, H, T, D) with outlier channels, row scales over two decades, rows of zeros and constant rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, T, D, generator=g) * (1 + 9 * (torch.rand(D, generator=g) < 0.05))
    x = x * torch.rand(B, H, T, 1, generator=g).mul(8).exp2().div(16)
    x[0, 0, 0] = 0.0
    x[-1, -1, T // 2] = 1.75
    x[0, -1, -1] = -0.3
    return x.to(device=device, dtype=dtype)


def _rope_tables(B, T, D, per_batch, seed):
    """cos, sin as transformers' LLaMA rotary embedding gives them: (B, T, D) at per-sequence positions, or (T, D)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    if per_batch:
        start = torch.randint(0, 3000, (B, 1), generator=torch.Generator().manual_seed(seed))
        pos = (start + torch.arange(T)).float()
    else:
        pos = torch.arange(T).float()
    emb = torch.cat([pos[..., None] * inv_freq] * 2, dim=-1)
    return emb.cos().to(DEVICE), emb.sin().to(DEVICE)


def _strided(x):
    """The same values as a (B, T, H, D) tensor transposed to (B, H, T, D), the layout the qkv output gives."""
    return x.transpose(1, 2).contiguous().transpose(1, 2)


def _assert_pack_equal(out, ref):
    for name, a, r in zip(("codes", "scale", "zero"), out, ref):
        assert torch.equal(a.cpu(), r.cpu()), (name, int((a.cpu() != r.cpu()).sum()))


def _assert_codes_near(out, ref, y, clip, rel=2e-6, max_frac=1e-4):
    """Codes and zero points equal the reference's, or differ by one only where the reference's fp32 value (y/scale
    for a code, −clip·min(y, 0)/scale for a zero) lies within rel·max(1, |value|) of a rounding boundary: the kernel
    sums the fp32 product rope(k)·tk in another order, which moves y and scale by a few ulp (measured in the
    interpreter, 2×8×512 rows of 128: ≤ 2 codes in 1e6 differ, ≤ 9.5e-7 from the boundary, where one ulp of a value
    near 15 is 9.5e-7, so the bound is relative; scales ≤ 6.7e-7 apart). Scales agree to rel."""
    (ca, sa, za), (cr, sr, zr) = [tuple(t.cpu() for t in o) for o in (out, ref)]
    y = y.cpu()
    D = y.shape[-1]
    assert float(((sa - sr).abs() / sr).max()) <= rel
    dist = lambda u: ((u - u.floor()) - 0.5).abs()  # noqa: E731
    near = lambda u: dist(u) < rel * u.abs().clamp(min=1)  # noqa: E731
    zflip = za != zr
    assert ((za - zr).abs() <= 1).all()
    assert not (zflip & ~near(-(y.amin(-1).clamp(max=0) * clip) / sr)).any()
    qa, qr = (unpack_int4_offset(c.reshape(-1, D // 2), 0).view(y.shape).int() for c in (ca, cr))
    diff = qa != qr
    assert int((qa - qr).abs().max()) <= 1
    assert not (diff & ~near(y / sr[..., None]) & ~zflip[..., None]).any(), int(diff.sum())
    assert float(diff.float().mean()) <= max_frac


# ---- kv_quant_pack ---------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,clip", [(64, 1.0), (128, 0.9), (80, 0.95)])
def test_kv_quant_pack_equals_fake_quant(dtype, D, clip):
    """Codes, scales and zeros equal the reference bit for bit, and dequantizing gives fake_quant's values exactly."""
    x = _strided(_rows(2, 3, 21, D, dtype, seed=D))
    out = kv_quant_pack(x, clip)
    ref = kv_quant_pack_ref(x.cpu(), clip)
    _assert_pack_equal(out, ref)
    assert out[0].shape == (2, 3, 21, D // 2) and out[0].dtype == torch.uint8 and out[1].shape == (2, 3, 21)
    spec = QuantSpec(bits=4, sym=False, granularity="head", group_size=D, clip_ratio=clip)
    deq = kv_dequant(*(t.cpu() for t in out))
    assert torch.equal(deq, fake_quant(x.cpu().float(), spec))
    assert torch.equal(deq.to(dtype), fake_quant(x.cpu(), spec))
    assert torch.equal(deq[0, 0, 0], torch.zeros(D))  # the row of zeros


@needs_triton
def test_kv_quant_pack_writes_exactly_its_slice_of_a_cache():
    """Written into cache[:, :, p:p+T]: every byte and scale of the slice is written (two poisons), nothing else."""
    B, H, Tmax, D, p, T = 2, 3, 40, 64, 9, 13
    x = _rows(B, H, T, D, torch.float16, seed=5)
    ref = kv_quant_pack_ref(x.cpu(), 0.9)
    for poison in (0x00, 0xFF):
        cache = (torch.full((B, H, Tmax, D // 2), poison, dtype=torch.uint8, device=DEVICE),
                 torch.full((B, H, Tmax), math.nan, device=DEVICE), torch.full((B, H, Tmax), math.nan, device=DEVICE))
        kv_quant_pack(x, 0.9, out=tuple(t[:, :, p:p + T] for t in cache))
        _assert_pack_equal([t[:, :, p:p + T] for t in cache], ref)
        assert (cache[0][:, :, :p] == poison).all() and (cache[0][:, :, p + T:] == poison).all()
        assert cache[1][:, :, :p].isnan().all() and cache[2][:, :, p + T:].isnan().all()


@needs_triton
@pytest.mark.parametrize("rope", [False, True])
def test_writes_at_a_device_position_equal_slice_writes(rope):
    """at= (the position read on the device, as a replayed CUDA graph needs): the same bytes as writing the slice
    cache[:, :, p:p+T], nothing else touched; a block running past the capacity keeps only what fits."""
    B, H, Tmax, D, T = 2, 3, 40, 64, 5
    x = _rows(B, H, T, D, torch.float16, seed=6)
    cos, sin = _rope_tables(B, T, D, True, seed=6)
    write = (lambda x, **kw: rope_k_quant_pack(x, cos, sin, None, 0.9, **kw)) if rope else \
        (lambda x, **kw: kv_quant_pack(x, 0.9, **kw))
    ref = write(x)
    for p, n in ((0, T), (17, T), (Tmax - 2, 2)):
        cache = (torch.full((B, H, Tmax, D // 2), 0xAB, dtype=torch.uint8, device=DEVICE),
                 torch.full((B, H, Tmax), math.nan, device=DEVICE), torch.full((B, H, Tmax), math.nan, device=DEVICE))
        at = torch.tensor([p], dtype=torch.int32, device=DEVICE)
        write(x, out=cache, at=at)
        for got, want in zip(cache, ref):
            assert torch.equal(got[:, :, p:p + n].cpu(), want[:, :, :n].cpu())
        assert (cache[0][:, :, :p] == 0xAB).all() and (cache[0][:, :, p + n:] == 0xAB).all()
        assert cache[1][:, :, :p].isnan().all() and cache[2][:, :, p + n:].isnan().all()
    with pytest.raises(ValueError, match="at= needs out="):
        kv_quant_pack(x, at=at)
    with pytest.raises(ValueError, match="one-element integer tensor"):
        kv_quant_pack(x, out=cache, at=torch.tensor([1.0], device=DEVICE))


# ---- rope_k_quant_pack -----------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_k_quant_pack_without_transform_is_exact(dtype, per_batch):
    """RoPE alone: the kernel's fp32 arithmetic, rounded per op, equals PyTorch's ops in k's dtype bit for bit."""
    B, H, T, D = 3, 2, 19, 64
    k = _strided(_rows(B, H, T, D, dtype, seed=7))
    cos, sin = _rope_tables(B, T, D, per_batch, seed=1)
    _assert_pack_equal(rope_k_quant_pack(k, cos, sin, None, 0.95),
                       rope_k_quant_pack_ref(k.cpu(), cos.cpu(), sin.cpu(), None, 0.95))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("D,per_batch,config", [(64, False, None), (128, True, None),
                                                (128, False, {"rows": 64}), (96, True, {"rows": 32})])
def test_rope_k_quant_pack_with_transform(dtype, D, per_batch, config):
    """RoPE then ·Tk (fp32): codes equal the reference's but for values on a rounding boundary."""
    B, H, T = 2, 3, 23
    k = _strided(_rows(B, H, T, D, dtype, seed=D + 1))
    cos, sin = _rope_tables(B, T, D, per_batch, seed=2)
    tk = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(D)))[0]
    tk = (tk * 1.3).float().to(DEVICE)
    out = rope_k_quant_pack(k, cos, sin, tk, 0.9, config=config)
    ref = rope_k_quant_pack_ref(k.cpu(), cos.cpu(), sin.cpu(), tk.cpu(), 0.9)
    _assert_codes_near(out, ref, rope_k_transform_ref(k.cpu(), cos.cpu(), sin.cpu(), tk.cpu()), 0.9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_reference_is_the_layers_formula(dtype):
    """Attention (flatquant.quant_layer) hands a QuantKVCache K before RoPE with its own cos/sin, and the fused
    write's reference RoPE of them is, bit for bit, the layer's formula (flatquant.rope.apply_rope, cos/sin cast to
    k's dtype) — what the layer applies to q, and to K when it keeps no codes."""
    from flatquant.cache import QuantKVCache
    from flatquant.quant_layer import Attention
    from flatquant.quantizers import Quantizer, QuantSpec
    from flatquant.rope import apply_rope

    B, H, T, D = 2, 3, 11, 64
    k = _rows(B, H, T, D, dtype, seed=4, device="cpu")
    cos, sin = (t.cpu() for t in _rope_tables(B, T, D, True, seed=4))
    parts = type("Parts", (), dict(num_heads=H, num_kv_heads=H, head_dim=D, layer_idx=0, q_norm=None, k_norm=None))
    attn = Attention(parts, Quantizer(QuantSpec(16)), Quantizer(QuantSpec(16)))
    seen = {}

    class Spy(QuantKVCache):  # records what the attention hands the cache
        def layer(self, i):
            layer = super().layer(i)
            layer.append = lambda kk, vv, *specs, rope=None, tk=None, q=None, tq=None: seen.update(k=kk, rope=rope, tk=tk)
            layer.dequantized = lambda dt: (seen["k"], seen["k"])
            return layer

    x = k.transpose(1, 2).reshape(B, T, H * D)
    attn(x, x, x, (cos.to(dtype), sin.to(dtype)), cache=Spy())
    assert torch.equal(seen["k"], k) and seen["tk"] is None
    layer_rope = apply_rope(k, *(t.to(dtype).unsqueeze(1) for t in (cos, sin)))
    assert torch.equal(rope_k_transform_ref(seen["k"], *seen["rope"]), layer_rope.float())


def _check_rope_transform(B, H, T, D, dtype, device, seed):
    """rope_transform against the references: RoPE alone bit for bit; with a transform, within one rounding to
    x's dtype of the fp32 product plus the fp32 sum-order slack of two D-term sums, the kernel's in 16-column chunks
    and the reference's (D/2 ulp of fp32 of the terms' sum each, the recursive-summation bound; measured up to
    4.6 of those ulp at D = 128 in the interpreter)."""
    from flatquant.rope import apply_rope

    x = _strided(_rows(B, H, T, D, dtype, seed=seed, device=device))
    cos, sin = (t.to(device) for t in _rope_tables(B, T, D, seed % 2 == 0, seed=seed))
    # every element compared: an element the kernel left unwritten (torch.empty's garbage) fails either check
    assert torch.equal(rope_transform(x, cos, sin).cpu(), rope_transform_ref(x.cpu(), cos.cpu(), sin.cpu()))
    m = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))[0]
    out = rope_transform(x, cos, sin, m.float().to(device)).cpu()
    assert out.dtype == dtype and out.shape == x.shape and not out.isnan().any()
    x, cos, sin, m = x.cpu(), cos.cpu(), sin.cpu(), m.float()
    y = rope_k_transform_ref(x, cos, sin, m)
    r = apply_rope(x, *(kv_kernels._rope_table(t, x).unsqueeze(1) for t in (cos, sin))).float()
    bound = torch.finfo(dtype).eps * y.abs() + D * torch.finfo(torch.float32).eps * (r.abs() @ m.abs())
    assert ((out.float() - y).abs() <= bound).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,D,seed", [(2, 3, 5, 64, 0), (1, 4, 1, 128, 1), (3, 2, 17, 32, 2)])
def test_rope_transform_matches_the_reference(B, H, T, D, seed, dtype):
    """The query side of the fused K write (RoPE and ·Tk⁻ᵀ in one kernel, nothing quantized), strided input."""
    _check_rope_transform(B, H, T, D, dtype, DEVICE, seed)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rope_transform_gpu_model_shapes(dtype):
    """LLaMA-3-8B's 32 query heads: a decode step of 64 sequences and a 300-token prefill of 2."""
    for B, T, seed in ((64, 1, 4), (2, 300, 5)):
        _check_rope_transform(B, 32, T, 128, dtype, "cuda", seed)


def _poisoned_cache(B, H, Tmax, D, device):
    return (torch.full((B, H, Tmax, D // 2), 0xAB, dtype=torch.uint8, device=device),
            torch.full((B, H, Tmax), math.nan, device=device), torch.full((B, H, Tmax), math.nan, device=device))


def _check_qkv_write(B, Hq, Hkv, T, D, dtype, transform, device, seed, p=5, v_out=None):
    """rope_qkv_write against the three writes it replaces, run one after another on poisoned caches: q, the K and
    the V caches equal bit for bit (every element written, nothing outside tokens p … p + T − 1 touched)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (_strided(_rows(B, h, T, D, dtype, seed=seed + i, device=device)) for i, h in enumerate((Hq, Hkv, Hkv)))
    cos, sin = (t.to(device) for t in _rope_tables(B, T, D, seed % 2 == 0, seed=seed))
    tq, tk = ((torch.linalg.qr(torch.randn(D, D, dtype=torch.float64, generator=g))[0].float().to(device)
               for _ in range(2)) if transform else (None, None))
    at = torch.tensor([p], dtype=torch.int32, device=device)
    Tmax = p + T + 3
    want_k, want_v = _poisoned_cache(B, Hkv, Tmax, D, device), _poisoned_cache(B, Hkv, Tmax, D, device)
    rope_k_quant_pack(k, cos, sin, tk, 0.9, out=want_k, at=at)
    kv_quant_pack(v, 0.95, out=want_v, at=at)
    want_q = rope_transform(q, cos, sin, tq)
    got_k = _poisoned_cache(B, Hkv, Tmax, D, device)
    got_v = _poisoned_cache(B, Hkv, Tmax, D, device) if v_out is None else v_out
    got_q = rope_qkv_write(q, k, v, cos, sin, tq, tk, 0.9, 0.95, got_k, got_v, at)
    assert got_q.shape == q.shape and got_q.dtype == dtype
    assert torch.equal(got_q.cpu(), want_q.cpu())
    for got, want in ((got_k, want_k), (got_v, want_v)):
        for a, b in zip(got, want):  # NaN (the poison) compared as NaN
            assert torch.equal(a.cpu().nan_to_num(-1.0), b.cpu().nan_to_num(-1.0))
        assert not got[1][:, :, p:p + T].isnan().any() and got[1][:, :, :p].isnan().all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,T,D,transform,seed", [(2, 4, 2, 1, 64, True, 0), (3, 2, 2, 3, 32, False, 1),
                                                         (1, 6, 3, 1, 128, True, 2)])
def test_rope_qkv_write_equals_the_three_writes(B, Hq, Hkv, T, D, transform, seed, dtype):
    """One launch for a step's q, K and V (programs side by side) computes what rope_transform, rope_k_quant_pack
    and kv_quant_pack compute one after another, bit for bit, GQA and strided inputs included."""
    _check_qkv_write(B, Hq, Hkv, T, D, dtype, transform, DEVICE, seed)


@needs_triton
def test_rope_qkv_write_with_caches_of_other_strides_writes_them_one_by_one():
    """K's and V's caches of different strides (V a slice of a wider buffer): the three writes run one after
    another, with the same results; mismatched shapes, clips and a missing position are refused."""
    B, H, D, Tmax = 2, 2, 32, 9
    wide = _poisoned_cache(B, H, 2 * Tmax, D, DEVICE)
    v_out = tuple(t[:, :, :Tmax] for t in wide)
    _check_qkv_write(B, 4, H, 1, D, torch.float16, True, DEVICE, 3, p=5, v_out=v_out)
    q, k = torch.zeros(B, 4, 1, D, device=DEVICE), torch.zeros(B, H, 1, D, device=DEVICE)
    cos = sin = torch.zeros(1, D, device=DEVICE)
    at = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="alike"):
        rope_qkv_write(q, k, k[:, :1], cos, sin, None, None, 1.0, 1.0, v_out, v_out, at)
    with pytest.raises(ValueError, match="clip"):
        rope_qkv_write(q, k, k, cos, sin, None, None, 0.0, 1.0, v_out, v_out, at)
    with pytest.raises(ValueError, match="give k_out, v_out and at"):
        rope_qkv_write(q, k, k, cos, sin, None, None, 1.0, 1.0, v_out, v_out, None)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_rope_qkv_write_gpu_model_shapes(dtype):
    """LLaMA-3-8B's heads (32 query, 8 kv, D = 128): decode steps of 1 and 64 sequences, and 3 tokens of 2."""
    for B, T, seed in ((1, 1, 4), (64, 1, 5), (2, 3, 6)):
        _check_qkv_write(B, 32, 8, T, 128, dtype, True, "cuda", seed, p=100)
    _check_qkv_write(64, 32, 8, 1, 128, torch.float16, False, "cuda", 7, p=0)


def _attention_k_write(dtype, device, B=2, H=2, D=64, steps=((9, 2), (1, 3))):
    """A QuantLayer attention with a learned-type K transform writes K into a QuantKVCache over a prefill and
    one-token steps (at the device position); checks the codes against rope_k_quant_pack_ref, the dequantized K
    against the fp32 value the write quantizes, and that value against what the layer quantizes without a cache
    (tk.apply of RoPE, rounded to k's dtype)."""
    from flatquant.cache import QuantKVCache
    from flatquant.quant_layer import Attention
    from flatquant.quantizers import Quantizer, QuantSpec
    from flatquant.rope import apply_rope
    from flatquant.transforms import KronTransform

    tk = KronTransform.learnable(D, (1, D), generator=torch.Generator().manual_seed(1)).to(device)
    tk.freeze()
    parts = type("Parts", (), dict(num_heads=H, num_kv_heads=H, head_dim=D, layer_idx=0, q_norm=None, k_norm=None))
    spec = QuantSpec(4, False, "head", D)  # no clipping: every value within half a step
    attn = Attention(parts, Quantizer(spec), Quantizer(spec))
    cache = QuantKVCache()
    ks, coss, sins = [], [], []
    for T, seed in steps:
        k = _rows(B, H, T, D, dtype, seed=seed, device=device)
        cos, sin = (t.to(device=device, dtype=dtype) for t in _rope_tables(B, T, D, True, seed=seed))
        x = k.transpose(1, 2).reshape(B, T, H * D)
        attn(x, x, x, (cos, sin), cache=cache, tk=tk)
        ks.append(k.cpu()), coss.append(cos.cpu()), sins.append(sin.cpu())
    k, cos, sin = torch.cat(ks, 2), torch.cat(coss, 1), torch.cat(sins, 1)
    n = k.shape[2]
    got = tuple(t[:, :, :n].cpu() for t in cache.layer(0).k)
    m = tk.dense().cpu()
    y = rope_k_transform_ref(k, cos, sin, m)
    _assert_codes_near(got, rope_k_quant_pack_ref(k, cos, sin, m), y, 1.0)
    r = apply_rope(k, cos.unsqueeze(1), sin.unsqueeze(1))
    terms = r.float().abs() @ m.abs()
    # half a step of the kernel's fp32 value, which differs from the reference's by their sums' orders
    slack = D * torch.finfo(torch.float32).eps * terms
    assert ((kv_dequant(*got) - y).abs() <= got[1][..., None] * 0.5 * (1 + 1e-5) + slack + 1e-6).all()
    # without a cache the layer rounds rope(k)·Tk to k's dtype: y up to one rounding of the product's terms
    # (measured ≤ 0.44 of this bound in fp16 and bf16 at 4 × 8 × 300 × 128)
    plain = tk.cpu().apply(r).float()
    assert ((plain - y).abs() <= torch.finfo(dtype).eps * terms + slack + 1e-6).all()


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_writes_k_through_the_fused_rope_transform_quantizer(dtype):
    """With a QuantKVCache the layer hands K before RoPE, its cos/sin and its K transform's matrix to one fused
    write (rope_k_quant_pack): the codes are the reference's (but for fp32 sums in another order), within half a
    step of rope(k)·Tk held in fp32, which the layer without a cache rounds to k's dtype."""
    _attention_k_write(dtype, "cpu")


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_writes_k_through_the_fused_write_gpu(dtype):
    """The same at LLaMA-3-8B's head shape on the GPU: a 300-token prefill of 4 sequences, then two decode steps."""
    _attention_k_write(dtype, "cuda", B=4, H=8, D=128, steps=((300, 5), (1, 6), (1, 7)))


@needs_triton
def test_rope_k_quant_pack_casts_tables_and_transform():
    """fp32 cos/sin are cast to k's dtype (as the layer does), an fp64 tk to fp32; shapes are checked."""
    B, H, T, D = 1, 2, 17, 64
    k = _rows(B, H, T, D, torch.float16, seed=3)
    cos, sin = _rope_tables(B, T, D, True, seed=3)
    tk = torch.eye(D, dtype=torch.float64, device=DEVICE)
    _assert_codes_near(rope_k_quant_pack(k, cos, sin, tk), rope_k_quant_pack_ref(k.cpu(), cos.cpu(), sin.cpu()),
                       rope_k_transform_ref(k.cpu(), cos.cpu(), sin.cpu()), 1.0)
    with pytest.raises(ValueError):
        rope_k_quant_pack(k, cos[:, :-1], sin[:, :-1])
    with pytest.raises(ValueError):
        rope_k_quant_pack(k, cos, sin, tk[:-1])


# ---- decode_attention ------------------------------------------------------------------------------------------


def _cache(B, Hkv, Tmax, D, lengths, seed, device=DEVICE):
    """Packed K/V caches with garbage past each length: random bytes, NaN scales and zeros."""
    k = _rows(B, Hkv, Tmax, D, torch.float32, seed, device)
    v = _rows(B, Hkv, Tmax, D, torch.float32, seed + 1, device)
    kc, ks, kz = kv_quant_pack(k)
    vc, vs, vz = kv_quant_pack(v)
    g = torch.Generator().manual_seed(seed)
    for b, n in enumerate(lengths):
        for c in (kc, vc):
            c[b, :, n:] = torch.randint(0, 256, c[b, :, n:].shape, generator=g, dtype=torch.uint8).to(device)
        for s in (ks, kz, vs, vz):
            s[b, :, n:] = math.nan
    return kc, ks, kz, vc, vs, vz


def _check_decode(q, cache, lengths, config=None):
    """Output (NaN-poisoned buffer) within fp32 rounding of the float64 reference; returns the max error."""
    out = torch.full_like(q, math.nan)
    decode_attention(q, *cache, lengths, out=out, config=config)
    ref = decode_attention_ref(q, *cache, lengths, out_dtype=torch.float64)
    assert not out.isnan().any(), "output elements left unwritten"
    vmax = max(float(kv_dequant(*(t[b:b + 1, :, :n] for t in cache[3:])).abs().max())
               for b, n in enumerate(lengths.tolist()) if n > 0)
    half_ulp = {torch.float32: 0.0, torch.float16: 2**-11, torch.bfloat16: 2**-8}[q.dtype]
    err = (out.double() - ref).abs()
    # fp32: scores, exp and sums each in fp32 (≈ 1e-7 relative); 1e-5·max|V| leaves ≈ 10× margin for the GPU's
    # approximate exp; plus the rounding of the output to q's dtype
    tol = 1e-5 * vmax + half_ulp * ref.abs()
    assert (err <= tol).all(), float((err - tol).max())
    return float(err.max())


@needs_triton
@pytest.mark.parametrize("B,lengths", [(1, [93]), (3, [1, 100, 47]), (5, [17, 1, 64, 100, 5])])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (8, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_decode_attention_matches_reference(B, lengths, D, Hq, Hkv, dtype):
    """Split over chunks of 32 tokens (blocks of 16: lengths 1, 5, 17, 47, 93 end inside a block or a chunk) with the
    merge kernel, and in one pass (chunk ≥ Tmax): both within fp32 rounding of the float64 reference."""
    Tmax = 100
    lengths_t = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    cache = _cache(B, Hkv, Tmax, D, lengths, seed=B + D + Hq)
    q = torch.randn(B, Hq, D, generator=torch.Generator().manual_seed(B * D)).to(device=DEVICE, dtype=dtype)
    _check_decode(q, cache, lengths_t, {"chunk": 32, "block_n": 16})
    _check_decode(q, cache, lengths_t, {"chunk": 128})


@needs_triton
def test_decode_attention_bf16_strided_q_and_odd_lengths():
    """bf16 q read through a strided view; a sequence of length 0 gives zeros and a length past the capacity
    attends over the whole cache (both clamped as the reference's mask does), in both paths."""
    B, Hq, Hkv, D, Tmax = 4, 4, 1, 64, 40
    lengths = torch.tensor([40, 0, 3, 999], dtype=torch.int32, device=DEVICE)
    cache = _cache(B, Hkv, Tmax, D, lengths.tolist(), seed=9)
    q = torch.randn(B, 2 * Hq, D, device=DEVICE).to(torch.bfloat16)[:, ::2]
    for config in ({"chunk": 16}, None):
        _check_decode(q, cache, lengths, config)
        assert (decode_attention(q, *cache, lengths, config=config)[1] == 0).all()


@needs_triton
def test_tf32_split_is_exact():
    """The tf32 parts decode_attention's products take: a1 = _tf32_round(a) and a2 = _tf32_round(a − a1) hold at
    most 11 significant bits (all a tf32 input keeps), a − a1 − a2 at most 2 more, so three parts sum to a exactly
    and two leave at most 2^-22·|a| (what the P·V weights drop)."""
    import triton
    import triton.language as tl

    @triton.jit
    def split(x_ptr, a1_ptr, a2_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        x = tl.load(x_ptr + i)
        a1 = kv_kernels._tf32_round(x)
        tl.store(a1_ptr + i, a1)
        tl.store(a2_ptr + i, kv_kernels._tf32_round(x - a1))

    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=g) * torch.rand(4096, generator=g).mul(60).sub(30).exp2()
    x[:4] = torch.tensor([0.0, 1.0, -1.0 - 2**-12, 3.0 * 2**-20])
    x = x.to(DEVICE)
    a1, a2 = torch.empty_like(x), torch.empty_like(x)
    split[(1,)](x, a1, a2, N=4096)
    a1, a2, x = a1.cpu(), a2.cpu(), x.cpu()
    for a in (a1, a2):
        assert (a.view(torch.int32) & 0x1FFF == 0).all()  # the 13 bits a tf32 input drops are zero
    rest = x.double() - a1.double() - a2.double()
    assert (rest.float().double() == rest).all()  # a − a1 − a2 is exact in fp32 …
    assert (rest.abs() <= 2.0**-22 * x.double().abs()).all()
    rest_bits = rest.float().view(torch.int32) & 0x7FFFFF
    assert ((rest == 0) | (rest_bits & 0x1FFFFF == 0)).all()  # … with ≤ 2 significant bits: exactly a third part
    assert ((x.double() - a1.double()).abs() <= 2.0**-11 * x.double().abs()).all()


@needs_triton
@pytest.mark.parametrize("B,Tmax,dtype,config,warps,splits", [
    (64, 2100, torch.float16, None, 1, 2),        # 512 sequence-heads: one wave of 1024 one-warp programs
    (8, 8244, torch.bfloat16, None, 1, 16),       # 16 chunks of 544 tokens: 1024 programs, not a wave and a bit
    (32, 8244, torch.float16, None, 1, 4),
    (8, 2100, torch.float16, None, 4, 9),         # too few long programs: 4 warps, 9 chunks of 256
    (1, 8244, torch.float16, None, 4, 43),        # 192-token chunks: at most MAX_SPLITS = 64 partials
    (64, 2100, torch.float32, None, 4, 2),        # fp32 q spills at one warp
    (64, 2100, torch.float16, {"num_warps": 4}, 4, 2),  # a config's tiles are kept
])
def test_decode_tiles_by_shape(monkeypatch, B, Tmax, dtype, config, warps, splits):
    """The tiles and splits the wrapper picks on a 132-SM GPU (no GPU needed: only the SM count is read)."""
    monkeypatch.setattr(kv_kernels, "_sm_count", lambda device: 132)
    dev = torch.device("cuda")
    cfg = kv_kernels._decode_config(4, 128, config, B, 8, Tmax, dev, dtype)
    chunk = kv_kernels._decode_chunk(B, 8, Tmax, cfg["block_n"], dev, cfg["chunk"], cfg["num_warps"])
    assert cfg["num_warps"] == warps and chunk % cfg["block_n"] == 0
    assert (cfg["block_n"], cfg["num_stages"]) == ((32, 3) if warps == 1 else (64, 2))
    assert math.ceil(Tmax / chunk) == splits
    if warps == 1:  # at most one wave of one-warp programs, each at least 256 tokens
        assert chunk >= 256 and B * 8 * splits <= max(kv_kernels._ONE_WARP_PER_SM * 132, B * 8)
    cpu = kv_kernels._decode_config(4, 128, config, B, 8, Tmax, torch.device("cpu"), dtype)
    assert cpu["num_warps"] == (config or {}).get("num_warps", 4) and cpu["block_n"] == 64


def test_decode_attention_checks_shapes():
    cache = _cache(2, 2, 8, 64, [8, 8], seed=1)
    lengths = torch.tensor([8, 8], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError):  # 3 query heads over 2 kv heads
        decode_attention(torch.randn(2, 3, 64, device=DEVICE), *cache, lengths)
    with pytest.raises(ValueError):  # head_dim 32 against codes of 64
        decode_attention(torch.randn(2, 4, 32, device=DEVICE), *cache, lengths)


def test_fallbacks_equal_references_without_triton():
    """Without triton every entry point runs its reference (and writes into out=)."""
    code = ("import torch\n"
            "from flatquant.kernels import kv_cache as kv\n"
            "assert not kv.HAS_TRITON\n"
            "x = torch.randn(2, 2, 9, 64).half()\n"
            "r = kv.kv_quant_pack_ref(x, 0.9)\n"
            "out = tuple(torch.empty_like(t) for t in r)\n"
            "assert all(torch.equal(a, b) for a, b in zip(kv.kv_quant_pack(x, 0.9, out=out), r))\n"
            "big = (torch.zeros(2, 2, 12, 32, dtype=torch.uint8), torch.zeros(2, 2, 12), torch.zeros(2, 2, 12))\n"
            "kv.kv_quant_pack(x, 0.9, out=big, at=torch.tensor([5]))\n"
            "assert all(torch.equal(a[:, :, 5:], b[:, :, :7]) for a, b in zip(big, r))\n"
            "cos, sin, tk = torch.randn(9, 64), torch.randn(9, 64), torch.randn(64, 64)\n"
            "r = kv.rope_k_quant_pack_ref(x, cos, sin, tk)\n"
            "assert all(torch.equal(a, b) for a, b in zip(kv.rope_k_quant_pack(x, cos, sin, tk), r))\n"
            "c = kv.kv_quant_pack(x) + kv.kv_quant_pack(x.flip(2))\n"
            "q, n = torch.randn(2, 4, 64).half(), torch.tensor([9, 4], dtype=torch.int32)\n"
            "o = torch.full_like(q, float('nan'))\n"
            "kv.decode_attention(q, *c, n, out=o)\n"
            "assert torch.equal(o, kv.decode_attention_ref(q, *c, n))\n"
            "qq, at = torch.randn(2, 4, 9, 64).half(), torch.tensor([2])\n"
            "kb, vb, kw, vw = (tuple(torch.zeros(2, 2, 12, *s, dtype=d) for s, d in (((32,), torch.uint8), ((), torch.float32), ((), torch.float32))) for _ in range(4))\n"
            "y = kv.rope_qkv_write(qq, x, x.flip(2), cos, sin, tk.T, tk, 0.9, 0.8, kb, vb, at)\n"
            "kv.rope_k_quant_pack(x, cos, sin, tk, 0.9, out=kw, at=at)\n"
            "kv.kv_quant_pack(x.flip(2), 0.8, out=vw, at=at)\n"
            "assert torch.equal(y, kv.rope_transform_ref(qq, cos, sin, tk.T))\n"
            "assert all(torch.equal(a, b) for a, b in zip(kb + vb, kw + vw))\n")
    run_without_triton(code, timeout=300)


# ---- GPU, model shapes (LLaMA-3-8B: D = 128, 32 query heads, 8 kv heads) -------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kv_cache_writes_gpu_model_shapes(dtype):
    """Prefill (2 × 4099 tokens) and decode (64 sequences × 1 token) writes against the CPU references."""
    for B, T in ((2, 4099), (64, 1)):
        x = _strided(_rows(B, 8, T, 128, dtype, seed=T))
        _assert_pack_equal(kv_quant_pack(x, 0.95), kv_quant_pack_ref(x.cpu(), 0.95))
        cos, sin = _rope_tables(B, T, 128, True, seed=T)
        _assert_pack_equal(rope_k_quant_pack(x, cos, sin, None, 0.95),
                           rope_k_quant_pack_ref(x.cpu(), cos.cpu(), sin.cpu(), None, 0.95))
        tk = torch.linalg.qr(torch.randn(128, 128, dtype=torch.float64))[0].float().cuda()
        _assert_codes_near(rope_k_quant_pack(x, cos, sin, tk, 0.95),
                           rope_k_quant_pack_ref(x.cpu(), cos.cpu(), sin.cpu(), tk.cpu(), 0.95),
                           rope_k_transform_ref(x.cpu(), cos.cpu(), sin.cpu(), tk.cpu()), 0.95)


def _run_c16_ptx(asm: str, word: int) -> tuple[int, int]:
    """Run _c16_asm's PTX on one 32-bit word: a small interpreter of the six instructions it uses (and, shr, mov,
    prmt, sub.f16x2, sub.rn.bf16x2); returns the two output registers $0, $1."""
    import re

    import numpy as np

    regs = {"$2": word}

    def val(t):
        return int(t, 0) if t[0].isdigit() else regs[t]

    def halves(v, dt):
        lo, hi = v & 0xFFFF, v >> 16
        if dt == "f16":
            return [float(np.array([h], np.uint16).view(np.float16)[0]) for h in (lo, hi)]
        return [float(np.array([h << 16], np.uint32).view(np.float32)[0]) for h in (lo, hi)]

    def pack(xs, dt):
        if dt == "f16":
            bits = [int(np.array([x], np.float16).view(np.uint16)[0]) for x in xs]
        else:  # the differences here are small integers: exact in bf16
            bits = [int(np.array([x], np.float32).view(np.uint32)[0]) >> 16 for x in xs]
        return bits[0] | bits[1] << 16

    body = asm.strip().strip("{}")
    for ins in filter(None, (i.strip() for i in body.split(";"))):
        op, *args = re.split(r"[\s,]+", ins)
        if op == ".reg":
            continue
        d, srcs = args[0], [val(a) for a in args[1:]]
        if op == "and.b32":
            regs[d] = srcs[0] & srcs[1]
        elif op == "shr.b32":
            regs[d] = srcs[0] >> srcs[1]
        elif op == "mov.b32":
            regs[d] = srcs[0]
        elif op == "prmt.b32":
            pool = srcs[0] | srcs[1] << 32
            regs[d] = sum(((pool >> (8 * ((srcs[2] >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))
        elif op in ("sub.f16x2", "sub.rn.bf16x2"):
            dt = "f16" if op == "sub.f16x2" else "bf16"
            regs[d] = pack([x - y for x, y in zip(halves(srcs[0], dt), halves(srcs[1], dt))], dt)
        else:
            raise AssertionError(f"instruction {op} not modelled")
    return regs["$0"], regs["$1"]


@pytest.mark.skipif(not kv_kernels.HAS_TRITON, reason="triton missing")
@pytest.mark.parametrize("bf16", [False, True])
def test_c16_unpack_ptx_gives_centred_codes(bf16):
    """decode_attention's GPU unpack (_c16_asm), run instruction by instruction: four packed bytes → their low
    (even) and high (odd) nibbles minus 8, in order, as fp16 or bf16 pairs, for every byte value in every lane."""
    import numpy as np

    g = torch.Generator().manual_seed(int(bf16))
    lanes = torch.stack([torch.randperm(256, generator=g) for _ in range(4)], 1).tolist()  # (256, 4) bytes
    for hi in (False, True):
        asm = kv_kernels._c16_asm(hi, bf16).value
        for b in lanes:
            r0, r1 = _run_c16_ptx(asm, b[0] | b[1] << 8 | b[2] << 16 | b[3] << 24)
            got = []
            for r in (r0, r1):
                for h in (r & 0xFFFF, r >> 16):
                    got.append(float(np.array([h], np.uint16).view(np.float16)[0]) if not bf16
                               else float(np.array([h << 16], np.uint32).view(np.float32)[0]))
            assert got == [float((x >> 4 if hi else x & 15) - 8) for x in b], (hi, b, got)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lengths", [[8192], [1, 8191, 4097, 300], [5000] * 16])
def test_decode_attention_gpu_model_shapes(dtype, lengths):
    """The default split (on 132 SMs: 64 chunks of 128 tokens for one sequence, 16 of 512 for four; for sixteen 8 of
    1024 at one warp a program, fp32 q 5 of 1664 at four) and a forced single pass, against the float64 reference,
    with the CPU run's tolerance."""
    B, Tmax = len(lengths), 8192
    cache = _cache(B, 8, Tmax, 128, lengths, seed=B)
    q = torch.randn(B, 32, 128, device="cuda").to(dtype)
    n = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    _check_decode(q, cache, n)
    _check_decode(q, cache, n, {"chunk": Tmax})


@needs_rerun
def test_interpreter_tests_in_subprocess():
    stdout = rerun_under_interpreter(__file__, timeout=900)
    passed = int(stdout.split(" passed")[0].split()[-1])
    assert passed >= N_INTERPRETER_TESTS, stdout[-500:]
