"""Kernel tests: Triton kernels against their PyTorch references on irregular shapes.

Without CUDA the kernels run through Triton's CPU interpreter: TRITON_INTERPRET=1 is set here before
``flatquant.kernels`` (and so triton) is imported, only on machines with no GPU, where it cannot change anything
else. Without triton the kernel tests skip and the PyTorch paths are still tested.

The W4A4 GEMM's fp8 path runs under the interpreter too (its ``tl.dot`` takes float8e4nv operands, summed
exactly in fp32 there); whether Hopper's reduced-precision fp8 accumulation keeps the sums exact only the
GPU tests can tell.
"""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # Should a kernels module have been imported before this one (its package is lazy, so only through a
    # direct import), define its kernels again now that the variable is set. If triton itself was imported
    # earlier, its library stays compiled and the interpreter tests skip (kron_quant.JIT_INTERPRETED).
    for _name in ("flatquant.kernels.kron_quant", "flatquant.kernels.w4a4_gemm", "flatquant.kernels.qlinear", "flatquant.kernels.bench"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

from flatquant.kernels import QuantLinear, kron_quant, w4a4_gemm, w4a4_gemm_ref
from flatquant.kernels.bench import check_gemm, check_kron_quant, check_qlinear, packed_ok
from flatquant.kernels.w4a4_gemm import fp8_supported, pick_config
from flatquant.packing import pack_int4_twos, unpack_int4_twos
from flatquant.quant_layer import QuantWeight
from kernel_helpers import (DEVICE, fp8_accumulation_probe, gpu, needs_cuda, needs_rerun, needs_triton,
                            rerun_under_interpreter, run_without_triton)


def _assert_check(r: dict):
    assert r["ok"], r


@needs_triton
@pytest.mark.parametrize("M,n1,n2", [(37, 24, 24), (37, 32, 48), (11, 86, 128)])
@pytest.mark.parametrize("sym", [True, False])
def test_kron_quant_fp16_matches_reference(M, n1, n2, sym):
    torch.manual_seed(n1 * n2 + sym)
    r = check_kron_quant(M, n1, n2, torch.float16, sym, DEVICE)
    _assert_check(r)
    assert r["scale_rel"] < 1e-5 and r["all_written"]


@needs_triton
@pytest.mark.parametrize("n1,n2,sym", [(24, 24, True), (32, 48, False)])
def test_kron_quant_bf16_matches_reference(n1, n2, sym):
    torch.manual_seed(7)
    r = check_kron_quant(37, n1, n2, torch.bfloat16, sym, DEVICE)
    _assert_check(r)
    assert r["scale_rel"] < 1e-5


@needs_triton
@pytest.mark.parametrize("n1,n2,config", [(24, 24, {"tokens": 2}), (32, 48, {"tokens": 4}),
                                          (24, 48, {"block_j": 32}), (32, 48, {"block_j": 16, "tokens": 2})])
def test_kron_quant_token_blocks_and_column_chunks(n1, n2, config):
    """Several tokens stacked per step (block-diagonal Lᵀ) and R in column chunks (two passes) agree too."""
    torch.manual_seed(n1 + n2)
    for sym in (True, False):
        r = check_kron_quant(13, n1, n2, torch.float16, sym, DEVICE, config)
        _assert_check(r)
        assert r["scale_rel"] < 1e-5


@needs_triton
def test_kron_quant_strided_rows_and_identity():
    """A row-strided view is read correctly, and identity factors give plain per-token quantization."""
    torch.manual_seed(3)
    n1, n2 = 24, 24
    big = torch.randn(37, 2 * n1 * n2).half()
    x = big[:, : n1 * n2]
    q, _, _ = kron_quant(x.to(DEVICE), torch.eye(n1), torch.eye(n2), 1.0, True)
    v = x.float() / (x.float().abs().amax(1, keepdim=True) / 7)
    expect = torch.clamp(torch.round(v), -8, 7)
    differ = unpack_int4_twos(q.cpu(), True) != expect.int()
    # the GPU divides approximately (a few ulp): only values on a rounding boundary may go the other way
    assert not differ[((v - v.floor()) - 0.5).abs() > 1e-5].any()


@needs_triton
@pytest.mark.parametrize("n1,n2,dtype,sym,codes", [(9, 64, torch.float16, True, "int4"),
                                                   (9, 64, torch.bfloat16, False, "int4"),
                                                   (16, 32, torch.float16, True, "e4m3"),
                                                   (32, 128, torch.float16, False, "int4")])
def test_kron_quant_identity_r_is_the_explicit_identity(n1, n2, dtype, sym, codes):
    """R=None (o_proj's H ⊗ I: one product a token instead of two) against the reference with an explicit identity
    R, and bit for bit the kernel's own output with that identity passed at the same launch settings (X·I rounded is
    X itself; stacked tokens would sum Lᵀ's products in another order). SmolLM2's 9 × 64 heads and LLaMA-3-8B's
    32 × 128."""
    torch.manual_seed(n1 * n2 + sym)
    r = check_kron_quant(21, n1, n2, dtype, sym, DEVICE, codes=codes, r_eye=True)
    _assert_check(r)
    assert r["scale_rel"] < 1e-5
    x = (torch.randn(21, n1 * n2) * 3).to(DEVICE, dtype)
    L = torch.linalg.qr(torch.randn(n1, n1))[0].to(DEVICE)
    a = kron_quant(x, L, None, 0.9, sym, codes=codes, config={"tokens": 1})
    b = kron_quant(x, L, torch.eye(n2, device=DEVICE), 0.9, sym, codes=codes, config={"tokens": 1})
    for u, v in zip(a, b):
        assert (u is None and v is None) or torch.equal(u.cpu(), v.cpu())
    with pytest.raises(ValueError, match="identity"):
        kron_quant(x[:, :-2], L, None, 0.9, sym)


@needs_triton
@pytest.mark.parametrize("M,N,K,asym,bias", [(37, 48, 576, False, False), (5, 40, 1536, True, True),
                                            (37, 50, 160, True, False), (1, 64, 2304, False, True)])
def test_w4a4_gemm_matches_float64_reference(M, N, K, asym, bias):
    torch.manual_seed(M + N + K)
    _assert_check(check_gemm(M, N, K, asym, bias, DEVICE))


@needs_triton
def test_w4a4_gemm_decode_tiles_and_bf16():
    torch.manual_seed(11)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_KH=64, GROUP_M=1, num_warps=4, num_stages=1)
    _assert_check(check_gemm(3, 37, 1152, False, True, DEVICE, config=cfg))
    _assert_check(check_gemm(19, 40, 576, True, False, DEVICE, out_dtype=torch.bfloat16))


def _split_k_workspaces_zero(device) -> bool:
    """Every split-K workspace and counter array cached for ``device`` (the current one and outgrown ones) is 0."""
    wmod = importlib.import_module("flatquant.kernels.w4a4_gemm")  # the package binds the name to the function
    return all(not ws.any() and not cnt.any() for ws, cnt in wmod._WORKSPACES.get(torch.device(device), []))


@needs_triton
@pytest.mark.parametrize("M", [1, 5, 16, 19])
def test_w4a4_gemm_split_k_equals_unsplit(M):
    """SPLIT_K=4 over KH=144 bytes in blocks of 32: 5 k-blocks, the last half masked, splits of 2, 2, 1 and 0
    blocks (the empty one still counts in); KH=160 (EVEN_K, unmasked loads): 5 whole blocks, split the same way;
    N=40: the second column tile masked; M=19: two row tiles. Signed and asymmetric activations, with and without
    bias, float32 out: bit-identical to SPLIT_K=1 and close to the float64 reference, on two draws of data (the
    second finds the workspace and counters that the first left); the cached workspace is all zero afterwards.
    fp8 with SPLIT_K > 1 is refused."""
    N = 40
    base = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_KH=32, GROUP_M=4, num_warps=4, num_stages=1)
    torch.manual_seed(100 + M)
    for K, asym, bias in ((288, False, False), (288, False, True), (288, True, False), (288, True, True),
                          (320, False, True), (320, True, False)):
        for draw in range(2):
            lo, hi = (0, 16) if asym else (-8, 8)
            qa = pack_int4_twos(torch.randint(lo, hi, (M, K))).to(DEVICE)
            qw = pack_int4_twos(torch.randint(-8, 8, (N, K))).to(DEVICE)
            sa, sw = (torch.rand(M) + 0.1).to(DEVICE), (torch.rand(N) * 1e-2 + 1e-3).to(DEVICE)
            za = torch.randint(0, 16, (M,)).float().to(DEVICE) if asym else None
            b = torch.randn(N).to(DEVICE) if bias else None
            ys = []
            for split in (1, 4):
                out = torch.full((M, N), float("nan"), device=DEVICE)
                ys.append(w4a4_gemm(qa, sa, qw, sw, za, None, b, torch.float32, out=out,
                                    config=dict(base, SPLIT_K=split)))
            ref = w4a4_gemm_ref(qa.cpu(), sa.cpu(), qw.cpu(), sw.cpu(), None if za is None else za.cpu(),
                                None if b is None else b.cpu(), torch.float64)
            case = (M, K, asym, bias, draw)
            assert not ys[1].isnan().any(), case
            assert torch.equal(ys[0], ys[1]), (case, float((ys[0] - ys[1]).abs().max()))
            assert float((ys[1].cpu().double() - ref).norm() / ref.norm()) < 1e-5, case
    assert _split_k_workspaces_zero(DEVICE)
    with pytest.raises(ValueError, match="int8 only"):
        w4a4_gemm(qa, sa, qw, sw, path="fp8", config=dict(base, SPLIT_K=2))


def test_pick_config_split_k():
    """Decode (M ≤ 16, int8): k is split only where a tile streams ≥ 2·_SPLIT_BYTES of weights, into at most
    tile_bytes // _SPLIT_BYTES splits, no more than 2·sms programs need, ≥ 2 k-blocks a split, at most 16, none
    empty; at LLaMA-3-8B's shapes only down_proj splits (what the H200 measured faster); no split where the tiles
    alone reach 2·sms, without an SM count, off CUDA, for fp8 and for prefill."""
    from flatquant.kernels.kron_quant import cdiv
    from flatquant.kernels.w4a4_gemm import _SPLIT_BYTES

    for M in (1, 7, 16):
        for N, KH in ((4096, 7168), (4096, 2048), (6144, 2048), (6144, 7168), (28672, 2048), (1000, 800),
                      (512, 32768)):
            cfg = pick_config(M, N, KH, True, False, 132)
            split, tiles, kb = cfg["SPLIT_K"], cdiv(N, cfg["BLOCK_N"]), cdiv(KH, cfg["BLOCK_KH"])
            per = cdiv(kb, split)
            case = (M, N, KH, split)
            assert 1 <= split <= 16 and cdiv(kb, per) == split, case  # every split gets blocks
            assert split == 1 or (per >= 2 and cfg["BLOCK_N"] * KH // split >= _SPLIT_BYTES // 2), case
            assert split <= max(1, cdiv(2 * 132, tiles)), case
    assert pick_config(1, 4096, 7168, True, False, 132)["SPLIT_K"] == 2  # down_proj: 64 tiles of 448 KB
    assert pick_config(16, 4096, 7168, True, False, 132)["SPLIT_K"] == 2
    for N in (6144, 4096, 28672):  # qkv, o_proj, up/gate: 128–256 KB a tile
        assert pick_config(1, N, 2048, True, False, 132)["SPLIT_K"] == 1
    assert pick_config(1, 512, 32768, True, False, 132)["SPLIT_K"] == 10  # 8 tiles of 2 MB: 2 MB // 192 KB
    assert pick_config(1, 4096, 7168, True, False, 32)["SPLIT_K"] == 1  # 64 tiles ≥ 2·32
    assert pick_config(1, 4096, 7168, True, False, None)["SPLIT_K"] == 1
    for cfg in (pick_config(1024, 4096, 2048, True, False, 132), pick_config(1, 4096, 7168, False),
                pick_config(1, 4096, 7168, True, True, 132), pick_config(64, 4096, 7168, True, False, 132)):
        assert cfg.get("SPLIT_K", 1) == 1, cfg


def _e4m3(codes: torch.Tensor) -> torch.Tensor:
    """uint8 bytes read as float8_e4m3fn → float64 values."""
    return codes.to(torch.uint8).view(torch.float8_e4m3fn).double()


def test_nibble_bytes_are_e4m3_codes():
    """The fp8 path's encoding: a zero-extended nibble byte c is the e4m3fn code of c·2^-9 (exponent field 0:
    subnormals, field 1: (8+m)·2^-9), and a negative nibble n's sign-magnitude byte 0x80 | |n| is n·2^-9."""
    c = torch.arange(16)
    assert torch.equal(_e4m3(c), c.double() * 2**-9)
    n = torch.arange(-8, 8)
    assert torch.equal(_e4m3(torch.where(n < 0, 0x80 | -n, n)), n.double() * 2**-9)


def _e4m3_unpack_ptx(p: torch.Tensor, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp8 unpack of w4a4_gemm on 32-bit words, step by step as its PTX (_f8_asm): (n, 4) uint8 bytes of
    words → (even-k, odd-k) (n, 4) uint8 e4m3 codes of the signed nibbles (center: unsigned nibbles − 8)."""
    b = p.to(torch.int64)
    full = 0xFFFFFFFF
    word = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24
    if center:
        word = word ^ 0x88888888                                # xor.b32

    def prmt_ba98(v):  # each byte ← its bit 7 replicated
        return sum(((v >> (8 * i + 7)) & 1) * (0xFF << (8 * i)) for i in range(4))

    out = []
    for hi in (False, True):
        u = (word >> 4 if hi else word) & 0x0F0F0F0F            # shr.b32, and.b32
        x = (0x90909090 - u) & full                             # sub.u32
        m = prmt_ba98(word if hi else (word << 4) & full)       # shl.b32 (low nibbles), prmt.b32
        u = (m & x) | (~m & full & u)                           # lop3.b32 0xCA
        out.append(torch.stack([(u >> (8 * i)) & 0xFF for i in range(4)], 1).to(torch.uint8))
    return out[0], out[1]


@pytest.mark.parametrize("center", [False, True])
def test_e4m3_unpack_of_every_byte_matches_the_nibbles(center):
    """Every byte value in every lane of a word (random neighbours) unpacks to the e4m3 codes of its signed
    nibbles, or (center, asymmetric activations) of its unsigned nibbles minus 8."""
    g = torch.Generator().manual_seed(int(center))
    p = torch.stack([torch.randperm(256, generator=g) for _ in range(4)], 1).to(torch.uint8)  # (256, 4)
    lo, hi = _e4m3_unpack_ptx(p, center)
    q = unpack_int4_twos(p.reshape(1, -1), not center) - (8 if center else 0)
    q = q.reshape(-1, 4, 2).double() * 2**-9
    assert torch.equal(_e4m3(lo), q[..., 0]) and torch.equal(_e4m3(hi), q[..., 1])


def _fp8_equals_int8(M: int, N: int, K: int, device: str):
    """Fresh random codes (every byte is a valid pair of signed or unsigned nibbles): for signed and asymmetric
    activations, with and without bias, fp16/bf16/fp32 out, the fp8 path's output equals the int8 path's bit
    for bit; outputs are poisoned with NaN first, so every element is checked as written."""
    qa = torch.randint(0, 256, (M, K // 2), dtype=torch.uint8, device=device)
    qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=device)
    sa = torch.rand(M, device=device) + 0.1
    sw = torch.rand(N, device=device) * 1e-2 + 1e-3
    za = torch.randint(0, 16, (M,), device=device).float()
    bias = torch.randn(N, device=device)
    for asym in (False, True):
        for b in (None, bias):
            for dt in (torch.float16, torch.bfloat16, torch.float32):
                ys = []
                for path in ("int8", "fp8"):
                    out = torch.full((M, N), float("nan"), dtype=dt, device=device)
                    ys.append(w4a4_gemm(qa, sa, qw, sw, za if asym else None, None, b, dt, out=out, path=path))
                case = (M, N, K, asym, b is not None, dt)
                assert not ys[1].isnan().any(), case
                assert torch.equal(ys[0], ys[1]), (case, float((ys[0].float() - ys[1].float()).abs().max()))


@needs_triton
@pytest.mark.parametrize("M,N,K,asym,bias", [(37, 48, 576, False, True), (5, 40, 1536, True, False),
                                            (19, 50, 160, True, True)])
def test_w4a4_gemm_fp8_path_matches_float64_reference(M, N, K, asym, bias):
    torch.manual_seed(M + N + K + 1)
    _assert_check(check_gemm(M, N, K, asym, bias, DEVICE, path="fp8"))


@needs_triton
def test_w4a4_gemm_fp8_path_equals_int8_path():
    torch.manual_seed(13)
    _fp8_equals_int8(21, 40, 1088, DEVICE)  # 1088 = 17·64: a masked K tail


needs_fp8 = pytest.mark.skipif(not (torch.cuda.is_available() and fp8_supported(torch.device("cuda"))),
                               reason="the fp8 path needs a Hopper GPU")


@gpu
@needs_fp8
@pytest.mark.parametrize("N,K", [(4096, 4096), (6144, 4096), (4096, 14336), (6144, 14336)])
@pytest.mark.parametrize("M", [1, 7, 16, 64, 300, 2048])
def test_w4a4_gemm_fp8_equals_int8_gpu(M, N, K):
    torch.manual_seed(M * N + K)
    _fp8_equals_int8(M, N, K, "cuda")


@gpu
@needs_fp8
@pytest.mark.parametrize("M", [1, 300, 2048])
def test_w4a4_gemm_fp8_exact_worst_case_gpu(M):
    """K=14336, unit scales, float32 out: both paths give w4a4_gemm_ref's exact integers for the largest sums
    (all codes −8, 64 per product, 917,504 in all; asymmetric 15 with zero point 0 against −8 weights) and for
    a probe of the fp8 accumulation: 7/8 of k at −8·−8, then ±1·±1, whose sums fall below the last bit that a
    14-bit accumulator of 2^19.6 keeps. On the H200, accumulating in the tensor core (Triton's default) failed
    the asymmetric case by up to 671,488 and the probe by up to 208; only fp32-added partial sums pass."""
    N, K = 4096, 14336
    g = torch.Generator(device="cuda").manual_seed(M)
    probe_a, probe_w = fp8_accumulation_probe(M, N, K, g)
    minus8 = torch.full((N, K // 2), 0x88, dtype=torch.uint8, device="cuda")
    cases = {"all -8": (torch.full((M, K // 2), 0x88, dtype=torch.uint8, device="cuda"), None, minus8),
             "asym 15, zero 0": (torch.full((M, K // 2), 0xFF, dtype=torch.uint8, device="cuda"),
                                 torch.zeros(M, device="cuda"), minus8),
             "probe": (pack_int4_twos(probe_a), None, pack_int4_twos(probe_w))}
    sa, sw = torch.ones(M, device="cuda"), torch.ones(N, device="cuda")
    for name, (qa, za, qw) in cases.items():
        ref = w4a4_gemm_ref(qa, sa, qw, sw, za, None, torch.float64)
        for path in ("int8", "fp8"):
            out = torch.full((M, N), float("nan"), device="cuda")
            y = w4a4_gemm(qa, sa, qw, sw, za, None, None, torch.float32, out=out, path=path)
            assert torch.equal(y.double(), ref), (name, path, int((y.double() != ref).sum()),
                                                  float((y.double() - ref).abs().max()))


@needs_triton
@pytest.mark.parametrize("sym", [True, False])
def test_quant_linear_kernel_path_matches_torch_path(sym):
    torch.manual_seed(5)
    _assert_check(check_qlinear(9, 576, 48, sym, DEVICE))


def _fake_quant_f64(x, w, L, R, clip, sym, bias):
    """quantize-dequantize(x·(L⊗R)) per token · (RTN per-channel dequantized w)ᵀ + bias, all float64."""
    y = x.double() @ torch.kron(L.double(), R.double()) if L is not None else x.double()
    if sym:
        s = clip * y.abs().amax(1, keepdim=True) / 7
        a = torch.clamp(torch.round(y / s), -8, 7) * s
    else:
        hi, lo = clip * y.amax(1, keepdim=True), clip * y.amin(1, keepdim=True)
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
        a = (torch.clamp(torch.round(y / s) + z, 0, 15) - z) * s
    sw = w.double().abs().amax(1, keepdim=True) / 7
    wq = torch.clamp(torch.round(w.double() / sw), -8, 7) * sw
    out = a @ wq.T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("kron", [True, False])
def test_quant_linear_torch_path_matches_float64_fake_quant(sym, kron):
    torch.manual_seed(1 + 2 * sym + kron)
    K, N = 32 * 48, 80
    w, b = torch.randn(N, K) * 0.02, torch.randn(N) * 0.1
    L = torch.linalg.qr(torch.randn(32, 32))[0] if kron else None
    R = torch.linalg.qr(torch.randn(48, 48))[0] if kron else None
    layer = QuantLinear.from_float(w, L=L, R=R, act_clip=0.9, act_sym=sym, bias=b)
    x = torch.randn(2, 13, K).half()
    y = layer.forward_torch(x.reshape(-1, K)).double()
    ref = _fake_quant_f64(x.reshape(-1, K), w, L, R, 0.9, sym, b)
    assert float((y - ref).norm() / ref.norm()) < 1e-3
    close = (y - ref).abs() <= 2 ** -10 * ref.abs() + 1e-4  # fp16 rounding of the output
    assert close.float().mean() > 0.999
    assert layer(x).shape == (2, 13, N)


def _quantized_tiny_llama(a_sym: bool, method: str = "flatquant"):
    """A 2-layer random LLaMA, W4A4KV4 with the method's untrained start transforms, merged (float32, CPU)."""
    from conftest import random_llama
    from flatquant.calibrate import CalibConfig, quantize_model
    from flatquant.methods import get_method
    from flatquant.spec import QuantConfig

    model = random_llama(hidden=128, inter=192, heads=4, kv_heads=2)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    quantize_model(model, ids, get_method(method), QuantConfig(a_sym=a_sym), CalibConfig(epochs=0, batch_size=2))
    return model


@needs_triton
@pytest.mark.parametrize("a_sym,method,fuse", [(True, "flatquant", True), (False, "flatquant", True),
                                               (True, "rtn", True), (True, "flatquant", False)])
def test_decoder_layers_on_kernels_match_fake_quant(a_sym, method, fuse):
    """use_kernels() swaps the four linear groups for QuantLinear: logits equal the fake-quant model's up to
    the rare activation that rounds the other way (different summation order). fuse: down_proj makes SwiGLU's
    product itself and the residual adds ride in the GEMMs (the default); without, they are kernels of their own."""
    import copy

    from flatquant.adapters import adapter_for

    model = _quantized_tiny_llama(a_sym, method)
    real = copy.deepcopy(model)
    for layer in adapter_for(real).layers(real):
        layer.use_kernels(fuse=fuse)
        assert layer.on_kernels and not any(isinstance(b, QuantWeight) for b in layer.modules())  # the kernels hold the only copy
        assert layer.down.glu == fuse and isinstance(layer.act, torch.nn.Identity) == fuse
    # float32: in fp16 both paths round the transformed activations to fp16 at different points, and 4-bit
    # rounding turns those 1e-3 differences into code flips (about 1% of a group's output, measured)
    dtype = torch.float32
    model, real = model.to(DEVICE), real.to(DEVICE)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        ref, out = model(ids).logits.float(), real(ids).logits.float()
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 2e-2
    per_token = (out - ref).norm(dim=-1) / ref.norm(dim=-1)
    assert float(per_token.median()) < 1e-4  # most tokens: no flip at all


@needs_triton
def test_exported_checkpoint_loads_onto_the_kernels(smollm2, tmp_path):
    """export → load_quantized → use_kernels: the loaded model runs in real W4A4 and matches the original."""
    from flatquant.export import export, load_quantized

    model = _quantized_tiny_llama(True)
    tokenizer = smollm2[1]
    model.resize_token_embeddings(len(tokenizer))
    export(model, tokenizer, tmp_path, {"name": "flatquant"})
    loaded, _ = load_quantized(tmp_path, device=DEVICE)
    for layer in loaded.model.layers:
        layer.use_kernels()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, out = model.to(DEVICE)(ids.to(DEVICE)).logits, loaded(ids.to(DEVICE)).logits
    assert float((out - ref).norm() / ref.norm()) < 2e-2
    assert float(((out - ref).norm(dim=-1) / ref.norm(dim=-1)).median()) < 1e-4


@needs_triton
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_fake_quant_equals_pytorch_quantizer(sym, dtype):
    """The fused K/V quantizer gives exactly flatquant's fake_quant values, on strided rows and ragged groups."""
    from flatquant.kernels.fused import group_fake_quant, group_fake_quant_ref

    torch.manual_seed(11)
    for group, n in ((64, 3), (128, 8), (48, 5)):
        base = torch.randn(37, 2 * group * n, device=DEVICE) * torch.rand(37, 1, device=DEVICE) * 4
        x = base[:, : group * n].to(dtype)  # rows strided like the v slice of the qkv output
        out, ref = group_fake_quant(x, group, 4, sym, 0.95), group_fake_quant_ref(x, group, 4, sym, 0.95)
        assert out.shape == x.shape and torch.isfinite(out).all()
        if DEVICE == "cpu":  # the interpreter and PyTorch's CPU kernels divide alike: identical values
            assert torch.equal(out, ref), float((out.float() - ref.float()).abs().max())
        else:  # PyTorch's CUDA kernels divide by a scalar as a·(1/b): scales may differ by an ulp, so a value
            # on a rounding boundary may take the neighbouring code, and outputs may differ in the last bit
            g = x.float().reshape(37, n, group)
            span = g.abs().amax(-1) if sym else g.amax(-1).clamp(min=0) - g.amin(-1).clamp(max=0)
            step = (span * 0.95 / (7 if sym else 15)).unsqueeze(-1).expand_as(g).reshape(x.shape)
            ulp = {torch.float32: 2**-23, torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
            diff, last_bit = (out.float() - ref.float()).abs(), 2 * ulp * ref.float().abs() + 1e-6
            flip = diff > last_bit
            assert (diff[flip] <= 1.01 * step[flip] + last_bit[flip]).all()  # at most one code apart
            assert float(flip.float().mean()) < 2e-3, float(flip.float().mean())


@needs_triton
def test_silu_mul_matches_pytorch():
    from flatquant.kernels.fused import silu_mul

    torch.manual_seed(12)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = (torch.randn(29, 2 * 72, device=DEVICE) * 3).to(dtype)
        ref = torch.nn.functional.silu(x[:, :72]) * x[:, 72:]
        out = silu_mul(x)
        ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-20}[dtype]
        assert out.shape == ref.shape
        assert ((out.float() - ref.float()).abs() <= 2 * ulp * ref.float().abs() + 1e-6).all()


@needs_triton
def test_rms_norm_matches_llama_rms_norm():
    """The fused RMSNorm against transformers' LlamaRMSNorm computed in float64 from the same inputs: within one
    rounding of the output dtype (plus fp32's of the statistics), for a weight in fp32 (rounded to x's dtype in the
    kernel) or in x's dtype, strided rows, a row of zeros, 3-D input and a width that is not a power of two."""
    _check_rms_norm(DEVICE)


@gpu
@needs_cuda
def test_rms_norm_matches_llama_rms_norm_gpu():
    _check_rms_norm("cuda")


def _check_rms_norm(device):
    from flatquant.kernels.fused import rms_norm, rms_norm_ref

    g = torch.Generator().manual_seed(21)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for N in (576, 1024):
            x = (torch.randn(2, 7, 2 * N, generator=g) * 4).to(dtype)[..., ::2].contiguous()[:, :, :N]
            x = torch.cat([x, torch.zeros(2, 1, N, dtype=dtype)], 1).to(device)
            for w in (torch.rand(N, generator=g) + 0.5, (torch.rand(N, generator=g) + 0.5).to(dtype)):
                w = w.to(device)
                y = rms_norm(x, w, 1e-6)
                xd = x.double()
                h = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).double()
                ref = w.to(dtype).double() * h
                ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7, torch.float32: 2**-22}[dtype]
                assert y.dtype == dtype and y.shape == x.shape
                assert ((y.double() - ref).abs() <= 2 * ulp * ref.abs() + 1e-30).all(), dtype
                assert (y[:, -1] == 0).all()
                same = (y == rms_norm_ref(x, w, 1e-6)).double().mean()
                assert same > (0.99 if dtype != torch.float32 else 0.5), (dtype, float(same))
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(torch.randn(2, 8, device=device), torch.ones(4, device=device), 1e-6)


def test_packed_ok_rejects_real_mismatches():
    base = dict(n=10000, mismatch=0, unexplained=0, max_level_diff=0)
    assert packed_ok(base)
    assert not packed_ok(dict(base, mismatch=1, unexplained=1, max_level_diff=2))
    assert not packed_ok(dict(base, mismatch=50, unexplained=50, max_level_diff=1))


def test_import_and_fallback_without_triton():
    code = ("import torch\n"
            "from flatquant import kernels\n"
            "assert not kernels.HAS_TRITON\n"
            "l = kernels.QuantLinear.from_float(torch.randn(16, 64), L=torch.eye(8), R=torch.eye(8))\n"
            "assert l(torch.randn(3, 64).half()).shape == (3, 16)\n")
    run_without_triton(code, timeout=120)


def _kq_case(M, n1, n2, N, dtype, device, seed):
    """Activations with an outlier channel, orthogonal-ish factors (values stay in range), random packed weights."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, n1 * n2, generator=g)
    x[:, seed % (n1 * n2)] *= 20
    L, R = (torch.linalg.qr(torch.randn(n, n, generator=g))[0] + 0.1 * torch.randn(n, n, generator=g)
            for n in (n1, n2))
    qw = torch.randint(0, 256, (N, n1 * n2 // 2), dtype=torch.uint8, generator=g)
    sw, bias = torch.rand(N, generator=g) * 1e-2 + 1e-3, torch.randn(N, generator=g)
    return (x.to(device=device, dtype=dtype), L.to(device), R.to(device), qw.to(device), sw.to(device),
            bias.to(device))


def _check_kq(M, n1, n2, N, dtype, sym, device, seed, config=None, r_eye=False):
    """kq_gemm (the transform, the quantizer and the GEMM in one launch) equals kron_quant then w4a4_gemm.
    r_eye: kq_gemm gets R=None (identity) and kron_quant an explicit identity R."""
    from flatquant.kernels.w4a4_gemm import kq_gemm, weight_sums

    x, L, R, qw, sw, bias = _kq_case(M, n1, n2, N, dtype, device, seed)
    if r_eye:
        R = torch.eye(n2, device=device)
    wsum = weight_sums(qw)
    got = kq_gemm(x, L, None if r_eye else R, 0.9, sym, qw, sw, wsum, bias, config=config)
    q, s, z = kron_quant(x, L, R, 0.9, sym)
    full = None if config is None else {**pick_config(M, N, n1 * n2 // 2, x.is_cuda, False, None), **config}
    want = w4a4_gemm(q, s, qw, sw, z, wsum, bias, out_dtype=dtype, config=full)
    assert got.dtype == dtype and got.shape == (M, N) and not got.isnan().any()
    assert torch.equal(got.cpu(), want.cpu()), float((got.float() - want.float()).abs().max())


@needs_triton
@pytest.mark.parametrize("M,n1,n2,N,dtype,sym,config", [
    (1, 16, 32, 64, torch.float32, True, None), (3, 32, 64, 96, torch.float16, False, None),
    (2, 64, 64, 40, torch.bfloat16, False, {"SPLIT_K": 2, "BLOCK_KH": 64}),
    (1, 24, 40, 48, torch.float16, True, {"SPLIT_K": 3})])
def test_kq_gemm_equals_kron_quant_then_gemm(M, n1, n2, N, dtype, sym, config):
    """One launch per decode linear: each GEMM program quantizes the tokens itself into its own scratch (split-K
    programs too), then streams its weights; the output is the two kernels' bit for bit (padded factors, odd N)."""
    _check_kq(M, n1, n2, N, dtype, sym, DEVICE, seed=M * n1 + N, config=config)


@needs_triton
def test_kq_gemm_identity_r():
    """R=None in the one-launch decode linear (o_proj's H ⊗ I) equals kron_quant with an explicit identity, then
    the GEMM, bit for bit."""
    _check_kq(1, 9, 64, 80, torch.float16, True, DEVICE, seed=9, r_eye=True)
    _check_kq(2, 16, 32, 48, torch.bfloat16, False, DEVICE, seed=10, r_eye=True)


@needs_triton
@pytest.mark.parametrize("M,n1,n2,dtype,sym,codes,config", [
    (5, 8, 16, torch.float16, True, "int4", None), (37, 12, 24, torch.float16, False, "int4", None),
    (9, 24, 24, torch.bfloat16, True, "e4m3", {"tokens": 2}), (4, 32, 48, torch.float16, False, "int4",
                                                               {"block_j": 32})])
def test_kron_quant_glu_equals_silu_mul_then_kron_quant(M, n1, n2, dtype, sym, codes, config):
    """kron_quant(glu=True) makes SwiGLU's product of [gate | up] as it loads the rows: the codes and scales are
    silu_mul's then kron_quant's bit for bit (padded factors, stacked tokens, column chunks, both code forms), every
    byte written, and the float reference's (``swiglu_ref`` then ``kron_quant_ref``)."""
    from flatquant.kernels.bench import check_kron_quant_fused
    from flatquant.kernels.kron_quant import kron_quant_ref

    torch.manual_seed(M + n1)
    _assert_check(check_kron_quant_fused(M, n1, n2, dtype, sym, DEVICE, codes, config))
    x = (torch.randn(M, 2 * n1 * n2) * 2).to(device=DEVICE, dtype=dtype)
    L, R = (torch.linalg.qr(torch.randn(n, n))[0].to(DEVICE) for n in (n1, n2))
    got = kron_quant(x, L, R, 0.9, sym, codes=codes, glu=True)
    want = kron_quant_ref(x.cpu(), L.cpu(), R.cpu(), 0.9, sym, codes=codes, glu=True)
    assert (got[0].cpu() != want[0]).float().mean() < 2e-3  # the rare code on a rounding boundary (GPU sums)
    with pytest.raises(ValueError, match="gate | up"):
        kron_quant(x[:, 1:], L, R, 0.9, sym, glu=True)


@needs_triton
@pytest.mark.parametrize("M,n1,n2,dtype,sym,codes,config", [
    (5, 8, 16, torch.float16, True, "int4", None), (37, 12, 24, torch.bfloat16, False, "int4", None),
    (9, 24, 24, torch.float16, True, "e4m3", {"tokens": 2}), (4, 32, 48, torch.float32, False, "int4",
                                                              {"block_j": 32})])
def test_kron_quant_norm_matches_rms_norm_then_kron_quant(M, n1, n2, dtype, sym, codes, config):
    """kron_quant(norm=(w, eps)) makes the residual stream's RMSNorm as it loads a token: its codes are rms_norm's
    then kron_quant's but for a rare code on a rounding boundary (the sums of squares run in another order; in the
    interpreter none differ), every byte written, and the float reference's (``rms_norm_ref`` then
    ``kron_quant_ref``); a weight of the wrong width is refused."""
    from flatquant.kernels.bench import check_kron_quant_fused
    from flatquant.kernels.kron_quant import kron_quant_ref

    torch.manual_seed(M + n2)
    r = check_kron_quant_fused(M, n1, n2, dtype, sym, DEVICE, codes, config, fused="norm")
    _assert_check(r)
    if DEVICE == "cpu" and dtype != torch.float32:
        assert r["equal"], r  # the same sums in the same order: bit for bit (fp32 scales differ in the last bits)
    x = (torch.randn(M, n1 * n2) * 3).to(device=DEVICE, dtype=dtype)
    w = torch.rand(n1 * n2, device=DEVICE) + 0.5
    L, R = (torch.linalg.qr(torch.randn(n, n))[0].to(DEVICE) for n in (n1, n2))
    got = kron_quant(x, L, R, 0.9, sym, codes=codes, norm=(w, 1e-5))
    want = kron_quant_ref(x.cpu(), L.cpu(), R.cpu(), 0.9, sym, codes=codes, norm=(w.cpu(), 1e-5))
    assert (got[0].cpu() != want[0]).float().mean() < 2e-3
    with pytest.raises(ValueError, match="norm"):
        kron_quant(x, L, R, 0.9, sym, norm=(w[1:], 1e-5))


@needs_triton
@pytest.mark.parametrize("M,N,K,asym,config,path", [
    (37, 48, 576, False, None, "int8"), (5, 40, 1536, True, {"SPLIT_K": 2}, "int8"),
    (3, 64, 256, False, None, "fp8")])
def test_w4a4_gemm_adds_the_residual_before_rounding(M, N, K, asym, config, path):
    """residual= goes into the epilogue: the output is the fp32 product plus the residual, rounded once to fp16
    (bit for bit: the float32 output is that product), strided residual rows included."""
    g = torch.Generator().manual_seed(M + N)
    lo, hi = (0, 16) if asym else (-8, 8)
    qa = pack_int4_twos(torch.randint(lo, hi, (M, K), generator=g)).to(DEVICE)
    qw = pack_int4_twos(torch.randint(-8, 8, (N, K), generator=g)).to(DEVICE)
    sa, sw = (torch.rand(M, generator=g) + 0.1).to(DEVICE), (torch.rand(N, generator=g) * 1e-2).to(DEVICE)
    za = torch.randint(0, 16, (M,), generator=g).float().to(DEVICE) if asym else None
    res = (torch.randn(M, 2 * N, generator=g) * 4).half().to(DEVICE)[:, ::2]  # rows strided, columns too
    full = None if config is None else {**pick_config(M, N, K // 2, DEVICE == "cuda", path == "fp8", None), **config}
    if path == "fp8" and DEVICE == "cuda" and not fp8_supported(torch.device(DEVICE)):
        pytest.skip("fp8 path needs Hopper")
    y32 = w4a4_gemm(qa, sa, qw, sw, za, None, None, torch.float32, config=full, path=path)
    y = w4a4_gemm(qa, sa, qw, sw, za, None, None, torch.float16, config=full, path=path, residual=res)
    assert torch.equal(y.cpu(), (y32 + res.float()).half().cpu())
    with pytest.raises(ValueError, match="residual"):
        w4a4_gemm(qa, sa, qw, sw, za, residual=res[:, :-1])


@needs_triton
@pytest.mark.parametrize("M,n1,n2,N,dtype,sym,fused", [(1, 16, 32, 64, torch.float16, True, "glu"),
                                                       (3, 24, 40, 48, torch.bfloat16, False, "glu"),
                                                       (1, 16, 32, 64, torch.float16, True, "norm"),
                                                       (2, 24, 40, 48, torch.bfloat16, False, "norm")])
def test_kq_gemm_glu_norm_and_residual_equal_the_two_kernels(M, n1, n2, N, dtype, sym, fused):
    """The one-launch decode linear with [gate | up] input (glu) or an RMSNorm in front (norm), and a residual,
    equals kron_quant with the same then w4a4_gemm(residual=...): bit for bit with glu (and in the interpreter);
    with a norm on the GPU the sums of squares may run in another order, so a rare code flips."""
    from flatquant.kernels.w4a4_gemm import kq_gemm, weight_sums

    x, L, R, qw, sw, bias = _kq_case(M, n1, n2, N, dtype, DEVICE, seed=M + N)
    if fused == "glu":
        kw = {"glu": True}
        x = torch.cat([x, x.flip(1) * 0.5], dim=1)  # [gate | up]
    else:
        kw = {"norm": (torch.rand(n1 * n2, device=DEVICE) + 0.5, 1e-6)}
    res = torch.randn(M, N, device=DEVICE).to(dtype)
    wsum = weight_sums(qw)
    got = kq_gemm(x, L, R, 0.9, sym, qw, sw, wsum, bias, residual=res, **kw)
    q, s, z = kron_quant(x, L, R, 0.9, sym, **kw)
    want = w4a4_gemm(q, s, qw, sw, z, wsum, bias, out_dtype=dtype, residual=res)
    if fused == "glu" or DEVICE == "cpu":
        assert torch.equal(got.cpu(), want.cpu()), float((got.float() - want.float()).abs().max())
    else:
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2


@needs_triton
@pytest.mark.parametrize("M", [1, 5])
def test_quant_linear_glu_and_residual_match_its_torch_path(M, monkeypatch):
    """A down_proj built with glu=True takes [gate | up] and adds forward's residual: the kernel path (one launch
    at one token, two kernels above) matches its fp32 torch path, and equals the unfused computation
    (silu_mul, then the layer, then the residual added after: fused=False) up to the one rounding."""
    from flatquant.kernels.fused import silu_mul

    qmod = importlib.import_module("flatquant.kernels.qlinear")
    monkeypatch.setattr(qmod, "KQ_MAX_TOKENS", 1)
    torch.manual_seed(M)
    _assert_check(check_qlinear(M, 512, 48, True, DEVICE, glu=True, residual=True))
    _assert_check(check_qlinear(M, 512, 48, False, DEVICE, residual=True, norm=True))
    L, R = (torch.linalg.qr(torch.randn(n, n))[0] for n in (16, 32))
    w = torch.randn(48, 512) * 0.05
    fused = QuantLinear.from_float(w, L=L, R=R, act_clip=0.9, glu=True).to(DEVICE)
    plain = QuantLinear.from_float(w, L=L, R=R, act_clip=0.9).to(DEVICE)
    plain.fused = False
    x = torch.randn(2, M, 1024, device=DEVICE).half()
    h = torch.randn(2, M, 48, device=DEVICE).half()
    got, want = fused(x, residual=h), plain(silu_mul(x.reshape(-1, 1024)).view(2, M, 512), residual=h)
    assert got.shape == (2, M, 48)
    # one rounding instead of two: within an fp16 ulp of the sum plus one of the product (larger where h cancels it)
    ulp = 2 ** -10 * (want.float().abs() + (want.float() - h.float()).abs()) + 2 ** -24
    assert ((got.float() - want.float()).abs() <= ulp).all()


def _gemv_case(M, N, K, asym, bias, residual, seed, device):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (0, 16) if asym else (-8, 8)
    qa = pack_int4_twos(torch.randint(lo, hi, (M, K), generator=g)).to(device)
    qw = pack_int4_twos(torch.randint(-8, 8, (N, K), generator=g)).to(device)
    qw[0] = 0x88  # a row of −8s: the extreme products
    sa, sw = (torch.rand(M, generator=g) + 0.1).to(device), (torch.rand(N, generator=g) * 1e-3).to(device)
    za = torch.randint(0, 16, (M,), generator=g).float().to(device) if asym else None
    b = torch.randn(N, generator=g).to(device) if bias else None
    res = torch.randn(M, N, generator=g).half().to(device) if residual else None
    return qa, sa, qw, sw, za, b, res


@needs_triton
@pytest.mark.parametrize("M,N,K,asym,bias,residual,config", [
    (1, 48, 576, False, False, False, None), (3, 40, 1536, True, True, True, None),
    (8, 33, 512, False, True, False, {"BLOCK_KW": 32}), (5, 64, 1600, True, False, True, {"BLOCK_N": 32})])
def test_w4a4_gemv_equals_the_tensor_core_gemm(M, N, K, asym, bias, residual, config):
    """The CUDA-core decode GEMV (dp4a on the nibbles' lanes; in the interpreter nibble by nibble) equals w4a4_gemm
    bit for bit (exact integer sums through one epilogue): signed and asymmetric activations, bias, residual, N not
    a multiple of the block (masked stores), k not a multiple of the step (1600: masked words), 1–8 tokens; every
    element written; what it refuses."""
    from flatquant.kernels.gemv import w4a4_gemv

    qa, sa, qw, sw, za, b, res = _gemv_case(M, N, K, asym, bias, residual, M + N, DEVICE)
    out = torch.full((M, N), float("nan"), dtype=torch.float16, device=DEVICE)
    got = w4a4_gemv(qa, sa, qw, sw, za, None, b, torch.float16, residual=res, config=config, out=out)
    want = w4a4_gemm(qa, sa, qw, sw, za, None, b, torch.float16, residual=res)
    assert not got.isnan().any() and torch.equal(got.cpu(), want.cpu())
    with pytest.raises(ValueError, match="tokens"):
        w4a4_gemv(torch.cat([qa] * 9), torch.cat([sa] * 9), qw, sw)
    with pytest.raises(ValueError, match="multiple of 4"):
        w4a4_gemv(qa[:, :-2], sa, qw[:, :-2], sw)


@needs_triton
def test_quant_linear_skips_an_identity_r(monkeypatch):
    """QuantLinear hands the kernels R=None when its R is the identity (and its factors otherwise), remade after an
    in-place write to R; the output is the explicit-identity computation's, bit for bit."""
    qmod = importlib.import_module("flatquant.kernels.qlinear")
    torch.manual_seed(4)
    L = torch.linalg.qr(torch.randn(9, 9))[0]
    layer = QuantLinear.from_float(torch.randn(40, 576) * 0.05, L=L, R=torch.eye(64), act_clip=0.9).to(DEVICE)
    seen = []
    real = qmod.kron_quant
    monkeypatch.setattr(qmod, "kron_quant", lambda x, L, R, *a, **k: seen.append(R) or real(x, L, R, *a, **k))
    monkeypatch.setattr(qmod, "KQ_MAX_TOKENS", 0)
    x = torch.randn(5, 576, device=DEVICE).half()
    y = layer(x)
    q, s, _ = real(x, L.half().to(DEVICE), torch.eye(64, device=DEVICE).half(), 0.9, True)
    assert seen == [None]
    assert torch.equal(y.cpu(), w4a4_gemm(q, s, layer.qweight, layer.wscale, out_dtype=torch.float16).cpu())
    with torch.no_grad():
        layer.R.copy_(torch.linalg.qr(torch.randn(64, 64))[0])
    layer(x)
    assert seen[-1] is not None and seen[-1].shape == (64, 64)


@needs_triton
def test_quant_linear_runs_one_launch_up_to_kq_max_tokens(monkeypatch):
    """QuantLinear.forward takes kq_gemm for up to KQ_MAX_TOKENS tokens (where kq_fuses), the two kernels above:
    the same outputs either way; kq_fuses refuses more than 16 tokens and factors past 64 × 128."""
    qmod = importlib.import_module("flatquant.kernels.qlinear")
    wmod = importlib.import_module("flatquant.kernels.w4a4_gemm")
    torch.manual_seed(3)
    L, R = (torch.linalg.qr(torch.randn(n, n))[0] for n in (16, 32))
    layer = QuantLinear.from_float(torch.randn(48, 512) * 0.05, L=L, R=R, act_clip=0.9, act_sym=False).to(DEVICE)
    calls = []
    real = wmod.kq_gemm
    monkeypatch.setattr(qmod, "kq_gemm", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
    for M in (1, 5):
        x = torch.randn(M, 512, device=DEVICE).half()
        monkeypatch.setattr(qmod, "KQ_MAX_TOKENS", 0)
        two = layer(x)
        monkeypatch.setattr(qmod, "KQ_MAX_TOKENS", 4)
        assert torch.equal(layer(x).cpu(), two.cpu())
    assert calls == [1]
    dev = torch.device(DEVICE)
    assert wmod.kq_fuses(16, 64, 128, torch.float16, dev) and not wmod.kq_fuses(17, 64, 64, torch.float16, dev)
    assert not wmod.kq_fuses(1, 112, 128, torch.float16, dev)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kq_gemm_gpu_model_shapes(dtype):
    """LLaMA-3-8B's 4096-wide linears (64 × 64 factors; o_proj's 32 × 128): qkv, o_proj and up/gate at 1, 4 and 16
    tokens, symmetric and asymmetric activations; down_proj's 112 × 128 runs the two kernels (kq_fuses), equal too."""
    for M, N, sym in ((1, 6144, True), (1, 28672, False), (4, 4096, False), (16, 28672, True), (1, 4096, True)):
        _check_kq(M, 64, 64, N, dtype, sym, "cuda", seed=M + N)
    _check_kq(1, 32, 128, 4096, dtype, False, "cuda", seed=3)  # o_proj's heads × head_dim (kron_quant stacks 2 there)
    _check_kq(1, 32, 128, 4096, dtype, True, "cuda", seed=4, r_eye=True)  # o_proj as the model runs it: R = I skipped
    _check_kq(1, 112, 128, 4096, dtype, False, "cuda", seed=5)


@gpu
@needs_cuda
@pytest.mark.parametrize("n1,n2", [(64, 64), (112, 128), (128, 224)])
def test_kron_quant_gpu_model_shapes(n1, n2):
    for sym in (True, False):
        _assert_check(check_kron_quant(1003, n1, n2, torch.float16, sym, "cuda"))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kron_quant_identity_r_gpu_model_shapes(dtype):
    """o_proj's 32 × 128 (LLaMA-3-8B) and 9 × 64 (SmolLM2) with R=None, both code forms, against the reference with an
    explicit identity; every byte written."""
    for n1, n2 in ((32, 128), (9, 64)):
        for sym, codes in ((True, "int4"), (False, "int4"), (True, "e4m3")):
            _assert_check(check_kron_quant(1003, n1, n2, dtype, sym, "cuda", codes=codes, r_eye=True))


@gpu
@needs_cuda
@pytest.mark.parametrize("n1,n2", [(112, 128), (64, 64)])
def test_kron_quant_glu_gpu_model_shapes(n1, n2):
    """down_proj's transform kernel making SwiGLU's product (LLaMA-3-8B's 112 × 128; 64 × 64 too) equals silu_mul
    then kron_quant bit for bit on the GPU, at one token and at 1003, both code forms, every byte written."""
    from flatquant.kernels.bench import check_kron_quant_fused

    for M in (1, 1003):
        for sym, codes in ((True, "int4"), (False, "int4"), (True, "e4m3")):
            _assert_check(check_kron_quant_fused(M, n1, n2, torch.float16, sym, "cuda", codes))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kron_quant_norm_gpu_model_shapes(dtype):
    """qkv's and up/gate's transform kernel making the RMSNorm in front (LLaMA-3-8B's 64 × 64; SmolLM2's 24 × 24)
    against fused.rms_norm then kron_quant on the GPU: a code flip in at most 1e-3, every byte written."""
    from flatquant.kernels.bench import check_kron_quant_fused

    for n1, n2 in ((64, 64), (24, 24)):
        for M in (1, 1003):
            for sym, codes in ((True, "int4"), (False, "int4"), (True, "e4m3")):
                _assert_check(check_kron_quant_fused(M, n1, n2, dtype, sym, "cuda", codes, fused="norm"))


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 4, 8])
def test_w4a4_gemv_gpu_model_shapes(M):
    """The CUDA-core decode GEMV (PTX lanes and dp4a) at LLaMA-3-8B's decode shapes equals w4a4_gemm bit for bit,
    every element written (output poisoned with NaN), signed and asymmetric activations, with a residual."""
    from flatquant.kernels.gemv import w4a4_gemv

    for N, K in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        for asym in (False, True):
            qa, sa, qw, sw, za, b, res = _gemv_case(M, N, K, asym, True, True, M + N + asym, "cuda")
            out = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
            got = w4a4_gemv(qa, sa, qw, sw, za, None, b, torch.float16, residual=res, out=out)
            assert not got.isnan().any(), (M, N, K, asym)
            assert torch.equal(got, w4a4_gemm(qa, sa, qw, sw, za, None, b, torch.float16, residual=res)), (M, N, K)


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 64, 2048])
def test_w4a4_gemm_residual_gpu(M):
    """The residual in the epilogue on the GPU (down_proj's 14336 → 4096 at decode, split-K, and prefill tiles):
    bit for bit the float32 product plus the residual, rounded once."""
    for K, N in ((14336, 4096), (4096, 4096)):
        g = torch.Generator().manual_seed(M + K)
        qa = pack_int4_twos(torch.randint(-8, 8, (M, K), generator=g)).cuda()
        qw = pack_int4_twos(torch.randint(-8, 8, (N, K), generator=g)).cuda()
        sa, sw = (torch.rand(M, generator=g) + 0.1).cuda(), (torch.rand(N, generator=g) * 1e-3).cuda()
        res = (torch.randn(M, N, generator=g) * 4).half().cuda()
        y32 = w4a4_gemm(qa, sa, qw, sw, out_dtype=torch.float32)
        out = torch.full((M, N), float("nan"), dtype=torch.float16, device="cuda")
        y = w4a4_gemm(qa, sa, qw, sw, out_dtype=torch.float16, out=out, residual=res)
        assert torch.equal(y, (y32 + res.float()).half()), (M, K)


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 600])
def test_quant_linear_glu_residual_gpu(M):
    """LLaMA-3-8B's down_proj as the fused layer runs it ([gate | up] in, residual added): the kernel path (two
    kernels at 1 and 16 tokens, the fp8 path at 600 on Hopper) against its fp32 torch path."""
    torch.manual_seed(M)
    _assert_check(check_qlinear(M, 14336, 4096, True, "cuda", glu=True, residual=True))
    _assert_check(check_qlinear(M, 4096, 6144, True, "cuda", norm=True))  # qkv with its norm, one launch at 1


@gpu
@needs_cuda
@pytest.mark.parametrize("M", [1, 16, 2048])
def test_w4a4_gemm_gpu(M):
    for asym in (False, True):
        _assert_check(check_gemm(M, 4096, 4096, asym, asym, "cuda"))


@gpu
@needs_cuda
@pytest.mark.parametrize("K,N", [(4096, 6144), (14336, 4096)])
@pytest.mark.parametrize("M", [1, 16])
def test_w4a4_gemm_split_k_gpu(M, K, N, monkeypatch):
    """LLaMA-3-8B decode shapes with the default config (pick_config's split), unit scales, float32 out: exactly
    w4a4_gemm_ref's integers and bit for bit the SPLIT_K=1 and a forced SPLIT_K=3 output, signed and
    asymmetric; inside a CUDA graph
    (warmed up first), replayed twice on new activations copied into its static inputs; captured with no
    workspace cached, the call runs unsplit and allocates nothing; the workspace is left all zero."""
    from flatquant.kernels.kron_quant import _sm_count, cdiv
    from flatquant.kernels.w4a4_gemm import weight_sums

    wmod = importlib.import_module("flatquant.kernels.w4a4_gemm")
    dev = torch.device("cuda", torch.cuda.current_device())
    g = torch.Generator(device=dev).manual_seed(M * N + K)
    cfg = pick_config(M, N, K // 2, True, False, _sm_count(dev))
    if K == 14336 and cdiv(N, cfg["BLOCK_N"]) < 2 * _sm_count(dev):
        assert cfg["SPLIT_K"] > 1, cfg  # down_proj splits by default (qkv does not: forced below)
    sa, sw = torch.ones(M, device=dev), torch.ones(N, device=dev)

    def acts(asym):
        qa = torch.randint(0, 256, (M, K // 2), dtype=torch.uint8, device=dev, generator=g)
        return qa, torch.randint(0, 16, (M,), device=dev, generator=g).float() if asym else None

    def captured(qa, za, qw, wsum):
        """A CUDA graph of the call on static inputs qa, za (warmed up on a side stream first), and its output."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                w4a4_gemm(qa, sa, qw, sw, za, wsum, None, torch.float32)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = w4a4_gemm(qa, sa, qw, sw, za, wsum, None, torch.float32)
        return graph, y

    def replays_exact(graph, y, qa, za, qw, asym):
        for _ in range(2):
            new_qa, new_za = acts(asym)
            qa.copy_(new_qa)
            if za is not None:
                za.copy_(new_za)
            graph.replay()
            torch.cuda.synchronize()
            ref = w4a4_gemm_ref(qa, sa, qw, sw, za, None, torch.float64)
            assert torch.equal(y.double(), ref), (asym, int((y.double() != ref).sum()))

    for asym in (False, True):
        qw = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, device=dev, generator=g)
        wsum = weight_sums(qw) if asym else None
        qa, za = acts(asym)
        ref = w4a4_gemm_ref(qa, sa, qw, sw, za, None, torch.float64)
        outs = [torch.full((M, N), float("nan"), device=dev) for _ in range(2)]
        y = w4a4_gemm(qa, sa, qw, sw, za, wsum, None, torch.float32, out=outs[0])
        y1 = w4a4_gemm(qa, sa, qw, sw, za, wsum, None, torch.float32, out=outs[1], config=dict(cfg, SPLIT_K=1))
        assert torch.equal(y.double(), ref), (asym, int((y.double() != ref).sum()))
        assert torch.equal(y, y1), asym
        y3 = w4a4_gemm(qa, sa, qw, sw, za, wsum, None, torch.float32, config=dict(cfg, SPLIT_K=3))
        assert torch.equal(y3, y1), asym  # a forced split of 3 (uneven blocks at K=14336) is exact too
        replays_exact(*captured(qa, za, qw, wsum), qa, za, qw, asym)
        assert _split_k_workspaces_zero(dev)
        with monkeypatch.context() as mp:  # nothing cached: the captured call runs unsplit, allocating nothing
            mp.setattr(wmod, "_WORKSPACES", {})
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                yg = w4a4_gemm(qa, sa, qw, sw, za, wsum, None, torch.float32)
            assert wmod._WORKSPACES == {}
            replays_exact(graph, yg, qa, za, qw, asym)


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@gpu
@needs_cuda
def test_kernel_groups_are_not_less_accurate_than_fake_quant():
    """Per linear group of a W4A4 decoder layer, for float32, fp16 and bf16 inputs: the kernel's output and fake
    quantization's in the same dtype, each against float64 fake quantization of the same input. On an H100
    (results/gpu/kernel_groups_tiny.json at this shape, kernel_groups_8b.json at 8B's: 20 group × dtype cases) the
    kernel erred 0.81–0.96× as much as fake quantization in fp16/bf16 (it rounds fewer intermediates to 16 bits)
    and 0.37–0.47× in float32 (both ≈ 1e-7 there: no code flipped); allowed: 1.10×, a margin over the worst case
    (0.955) for another GPU or driver, far below what a wrong code, scale or factor gives (errors of order 1).
    Activation codes differed from the PyTorch reference's in at most 3e-6 of the entries and scales by at most
    5e-6 (allowed: 1e-3 and 1e-4)."""
    import torch.nn.functional as F

    from flatquant.bench_layer import build_layers
    from flatquant.kernels.kron_quant import kron_quant_ref
    from flatquant.adapters import GROUPS

    _, real, fake, _ = build_layers(128, 192, 4, 2, 32)  # Kronecker factors 8×16 (qkv, upgate), 12×16 (down), heads 4×32
    torch.manual_seed(0)
    w = fake.weights()
    for dt in (torch.float32, torch.float16, torch.bfloat16):  # the order the H100 run drew its inputs in
        for slot in GROUPS:
            ql, group = getattr(real, slot), getattr(fake, slot)
            x = torch.randn(256, ql.in_features, device="cuda").to(dt)
            with torch.no_grad():
                kernel = ql(x)
                fq = torch.cat([F.linear(group.aq(group.transform(x)), w[m].to(dt)) for m in GROUPS[slot]], -1)
                x64 = group.aq(group.transform(x.double()))
                f64 = torch.cat([F.linear(x64, w[m].double()) for m in GROUPS[slot]], -1)
                L, R = ql._factors(dt, x.device)
                q, s, _ = kron_quant(x, L, R, ql.act_clip, ql.act_sym)
                qr, sr, _ = kron_quant_ref(x, L, R, ql.act_clip, ql.act_sym)
            case = (str(dt), slot)
            assert torch.isfinite(kernel).all(), case
            assert _rel(kernel, f64) <= 1.10 * _rel(fq, f64), (case, _rel(kernel, f64), _rel(fq, f64))
            assert float((unpack_int4_twos(q, ql.act_sym) != unpack_int4_twos(qr, ql.act_sym)).float().mean()) < 1e-3, case
            assert _rel(s, sr) < 1e-4, (case, _rel(s, sr))


@needs_rerun
def test_interpreter_tests_in_subprocess():
    stdout = rerun_under_interpreter(__file__, timeout=600)
    assert "25 passed" in stdout or int(stdout.split(" passed")[0].split()[-1]) >= 25, stdout[-500:]


def test_host_launch_arithmetic_equals_triton_s():
    """kron_quant.cdiv / next_pow2 (plain functions the wrappers call per launch) equal triton.cdiv /
    triton.next_power_of_2, which are constexpr functions costing microseconds a call."""
    triton = pytest.importorskip("triton")
    from flatquant.kernels.kron_quant import cdiv, next_pow2

    assert all(next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 20000))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 5000, 7) for b in range(1, 300, 3))
