"""The fp8 prefill path (flatquant/kernels/e4m3.py): 4-bit codes as e4m3 bytes and cuBLAS's fp8 GEMM.

On the CPU the two new kernels (``kron_quant(codes="e4m3")``, ``e4m3_weight``) run in Triton's interpreter against
their PyTorch references, and QuantLinear's fp8 branch runs with the GEMM's float64 reference; on a Hopper GPU
(`-m gpu`) cuBLAS's sums are checked to be the exact integers at K = 14336, extreme codes included.
"""
import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    for _name in ("flatquant.kernels.kron_quant", "flatquant.kernels.e4m3", "flatquant.kernels.w4a4_gemm",
                  "flatquant.kernels.qlinear", "flatquant.kernels.bench"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])

from flatquant.kernels import QuantLinear, kron_quant, w4a4_gemm
from flatquant.kernels import qlinear as qlinear_mod
from flatquant.kernels.bench import _rand_factor, check_kron_quant
from flatquant.kernels.e4m3 import E4M3_UNIT, e4m3_weight, scaled_mm_supported, scaled_mm_w4a4
from flatquant.packing import pack_e4m3, pack_int4_twos, unpack_int4_twos
from kernel_helpers import DEVICE, fp8_accumulation_probe, gpu, needs_rerun, needs_triton, rerun_under_interpreter

needs_scaled_mm = pytest.mark.skipif(not (torch.cuda.is_available() and scaled_mm_supported(torch.device("cuda"))),
                                     reason="cuBLAS's fp8 GEMM path is taken on Hopper GPUs only")


def test_pack_e4m3_bytes_are_the_codes_times_2_to_minus_9():
    q = torch.arange(-15, 16)
    b = pack_e4m3(q)
    assert b.dtype == torch.uint8
    assert torch.equal(b.view(torch.float8_e4m3fn).double(), q.double() * E4M3_UNIT)
    assert b[q == 0].item() == 0 and b[q == -8].item() == 0x88 and b[q == 7].item() == 7


def test_e4m3_weight_torch_fallback_on_every_byte():
    qw = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    w8 = e4m3_weight(qw) if DEVICE == "cpu" and not qlinear_mod.use_triton(qw) else None
    if w8 is None:
        pytest.skip("Triton runs here: the kernel test covers it")
    assert torch.equal(w8.double() / E4M3_UNIT, unpack_int4_twos(qw, signed=True).double())


@needs_triton
@pytest.mark.parametrize("N,KH", [(37, 291), (3, 4096 + 5), (1, 1)])
def test_e4m3_weight_kernel_matches_reference(N, KH):
    """Every byte value, irregular sizes (a masked tail), poisoned outputs: each e4m3 byte is the code its nibble
    holds, low nibble first."""
    g = torch.Generator().manual_seed(N * KH)
    qw = torch.randint(0, 256, (N, KH), dtype=torch.uint8, generator=g)
    qw.view(-1)[: min(256, qw.numel())] = torch.arange(min(256, qw.numel()), dtype=torch.uint8)
    qw = qw.to(DEVICE)
    outs = []
    for poison in (0x7F, 0x00):
        out = torch.full((N, 2 * KH), poison, dtype=torch.uint8, device=DEVICE)
        outs.append(e4m3_weight(qw, out=out))
    assert outs[0].dtype == torch.float8_e4m3fn
    assert torch.equal(outs[0].view(torch.uint8), outs[1].view(torch.uint8))  # every byte written
    expect = unpack_int4_twos(qw.cpu(), signed=True)
    assert torch.equal((outs[0].cpu().double() / E4M3_UNIT), expect.double())


@needs_triton
@pytest.mark.parametrize("M,n1,n2,config", [(37, 24, 24, None), (11, 86, 128, None), (13, 32, 48, {"tokens": 4}),
                                            (13, 24, 48, {"block_j": 32})])
def test_kron_quant_e4m3_codes_match_reference(M, n1, n2, config):
    """codes="e4m3" writes the integers the int4 path packs, one byte each (stacked tokens and column chunks too)."""
    torch.manual_seed(M + n1 + n2)
    r = check_kron_quant(M, n1, n2, torch.float16, True, DEVICE, config, codes="e4m3")
    assert r["ok"] and r["all_written"] and r["scale_rel"] < 1e-5, r


@needs_triton
def test_kron_quant_e4m3_equals_int4_codes_bit_for_bit():
    torch.manual_seed(4)
    x = torch.randn(19, 24 * 48, dtype=torch.float16).to(DEVICE)
    L, R = _rand_factor(24, DEVICE), _rand_factor(48, DEVICE)
    q4, s4, _ = kron_quant(x, L, R, 0.9, True)
    q8, s8, _ = kron_quant(x, L, R, 0.9, True, codes="e4m3")
    assert torch.equal(s4, s8)
    assert torch.equal(pack_e4m3(unpack_int4_twos(q4.cpu(), signed=True)), q8.cpu())


def test_kron_quant_e4m3_refuses_asymmetric_and_unknown_codes():
    x, eye = torch.randn(2, 16), torch.eye(4)
    with pytest.raises(ValueError, match="symmetric"):
        kron_quant(x, eye, eye, 1.0, False, codes="e4m3")
    with pytest.raises(ValueError, match="codes"):
        kron_quant(x, eye, eye, 1.0, True, codes="fp8")


def test_scaled_mm_w4a4_falls_back_to_its_float64_reference():
    torch.manual_seed(2)
    M, N, K = 5, 24, 64
    qa, qw = torch.randint(-8, 8, (M, K)), torch.randint(-8, 8, (N, K))
    sa, sw, bias = torch.rand(M) + 0.1, torch.rand(N) * 1e-2, torch.randn(N)
    y = scaled_mm_w4a4(pack_e4m3(qa), sa, pack_e4m3(qw).view(torch.float8_e4m3fn), sw, bias, torch.float64)
    expect = (qa.double() @ qw.double().T) * sa.double()[:, None] * sw.double()[None, :] + bias.double()
    assert torch.allclose(y, expect, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="shapes"):
        scaled_mm_w4a4(pack_e4m3(qa), sa[:2], pack_e4m3(qw), sw)


@needs_triton
@pytest.mark.parametrize("bias", [False, True])
def test_quant_linear_fp8_branch_matches_int8_branch(bias, monkeypatch):
    """QuantLinear's fp8 branch (kron_quant e4m3 codes, e4m3_weight, the GEMM — its float64 reference here) gives
    the int8 branch's output: the same codes, summed exactly by both, so within the output's rounding."""
    torch.manual_seed(6 + bias)
    K, N = 576, 48
    n1, n2 = 24, 24
    layer = QuantLinear.from_float(torch.randn(N, K) * 0.02, L=_rand_factor(n1, "cpu").float(),
                                   R=_rand_factor(n2, "cpu").float(), act_clip=0.9, act_sym=True,
                                   bias=torch.randn(N) if bias else None).to(DEVICE)
    x = torch.randn(40, K, dtype=torch.float16, device=DEVICE)
    monkeypatch.setattr(qlinear_mod, "FP8_MIN_TOKENS", 0)
    y_int8 = layer(x)
    monkeypatch.setattr(qlinear_mod, "FP8_MIN_TOKENS", 16)
    monkeypatch.setattr(qlinear_mod, "scaled_mm_supported", lambda device: True)
    assert layer.fp8_path(x) and not layer.fp8_path(x[:15])
    y_fp8 = layer(x)
    assert not y_fp8.isnan().any()
    assert ((y_fp8.float() - y_int8.float()).abs() <= 2e-3 * y_int8.float().abs() + 1e-4).all()


def test_quant_linear_fp8_scale_follows_in_place_weight_scale_changes(monkeypatch):
    """The per-layer column scale the fp8 path keeps is remade when wscale is written in place (load_state_dict)."""
    monkeypatch.setattr(qlinear_mod, "FP8_MIN_TOKENS", 1)
    monkeypatch.setattr(qlinear_mod, "scaled_mm_supported", lambda device: True)
    torch.manual_seed(8)
    layer = QuantLinear.from_float(torch.randn(32, 64), act_sym=True)
    x = torch.randn(5, 64, dtype=torch.float16)
    y = layer(x).float()
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    state["wscale"] *= 2
    layer.load_state_dict(state)
    assert torch.allclose(layer(x).float(), 2 * y, rtol=2e-3, atol=1e-3)
    with torch.inference_mode():  # buffers made there keep no version counter: still runs
        fresh = QuantLinear.from_float(torch.randn(32, 64), act_sym=True)
        assert fresh(x).shape == (5, 32)


@needs_triton
def test_quant_linear_keeps_fp8_weights_when_asked(monkeypatch):
    """fp8_weights="keep": the e4m3 bytes are made once (e4m3_weight runs once over several calls), remade after an
    in-place write to qweight, and the output is the per-call expansion's, bit for bit; a bad setting is refused."""
    monkeypatch.setattr(qlinear_mod, "FP8_MIN_TOKENS", 1)
    monkeypatch.setattr(qlinear_mod, "scaled_mm_supported", lambda device: True)
    torch.manual_seed(9)
    layer = QuantLinear.from_float(torch.randn(32, 64), act_sym=True).to(DEVICE)
    x = torch.randn(5, 64, dtype=torch.float16, device=DEVICE)
    y = layer(x)
    made = []
    real = qlinear_mod.e4m3_weight
    monkeypatch.setattr(qlinear_mod, "e4m3_weight", lambda *a, **k: made.append(1) or real(*a, **k))
    layer.fp8_weights = "keep"
    assert torch.equal(layer(x), y) and torch.equal(layer(x), y) and len(made) == 1
    with torch.no_grad():
        layer.qweight.copy_(layer.qweight.flip(0))
        layer.wscale.copy_(layer.wscale.flip(0))
    assert torch.equal(layer(x), y.flip(-1)) and len(made) == 2
    monkeypatch.setattr(qlinear_mod, "FP8_WEIGHTS", "always")
    with pytest.raises(ValueError, match="FLATQUANT_FP8_WEIGHTS"):
        QuantLinear(64, 32)


def test_quant_linear_capture_uses_the_kept_fp8_weights(monkeypatch):
    """While a CUDA graph is captured, fp8_weights="keep" hands the GEMM the bytes an eager call kept (the graph
    skips the expansion) and makes none (capture memory is not kept): the first capture without an eager warm-up
    expands in the graph instead, with the same output."""
    monkeypatch.setattr(qlinear_mod, "FP8_MIN_TOKENS", 1)
    monkeypatch.setattr(qlinear_mod, "scaled_mm_supported", lambda device: True)
    torch.manual_seed(10)
    layer = QuantLinear.from_float(torch.randn(32, 64), act_sym=True).to(DEVICE)
    layer.fp8_weights = "keep"
    x = torch.randn(3, 64, dtype=torch.float16, device=DEVICE)
    handed = []
    real = qlinear_mod.e4m3_linear
    monkeypatch.setattr(qlinear_mod, "e4m3_linear", lambda *a, **k: handed.append(a[-1]) or real(*a, **k))
    monkeypatch.setattr(qlinear_mod, "_capturing", lambda device: True)
    y_cold = layer(x)  # a capture before any eager call: nothing kept, nothing made
    assert handed[-1] is None and not layer._w8_cache
    monkeypatch.setattr(qlinear_mod, "_capturing", lambda device: False)
    y = layer(x)  # eager: the bytes are made and kept
    (kept,) = layer._w8_cache.values()
    assert handed[-1] is kept
    monkeypatch.setattr(qlinear_mod, "_capturing", lambda device: True)
    assert torch.equal(layer(x), y) and handed[-1] is kept and torch.equal(y_cold, y)


def test_quant_linear_fp8_path_needs_symmetric_16_bit_inputs(monkeypatch):
    monkeypatch.setattr(qlinear_mod, "FP8_MIN_TOKENS", 1)
    monkeypatch.setattr(qlinear_mod, "scaled_mm_supported", lambda device: True)
    sym = QuantLinear.from_float(torch.randn(32, 64), act_sym=True)
    asym = QuantLinear.from_float(torch.randn(32, 64), act_sym=False)
    x = torch.randn(4, 64, dtype=torch.float16)
    assert sym.fp8_path(x) and not asym.fp8_path(x) and not sym.fp8_path(x.float())
    assert not QuantLinear.from_float(torch.randn(40, 72), act_sym=True).fp8_path(torch.randn(4, 72).half())


@gpu
@needs_scaled_mm
@pytest.mark.parametrize("M", [128, 300, 2048])
def test_scaled_mm_w4a4_exact_gpu(M):
    """K = 14336, unit scales, float32 out: cuBLAS's fp8 GEMM (fast accumulation off) gives the exact integers for
    the largest sums (all codes −8: 917,504), for random codes, and for the accumulation probe of the Triton fp8
    test (7/8 of k at −8·−8, then ±1·±1: sums below the last bit a 14-bit accumulator keeps)."""
    N, K = 4096, 14336
    g = torch.Generator(device="cuda").manual_seed(M)
    probe_a, probe_w = fp8_accumulation_probe(M, N, K, g)
    cases = {"all -8": (torch.full((M, K), -8, device="cuda"), torch.full((N, K), -8, device="cuda")),
             "random": (torch.randint(-8, 8, (M, K), device="cuda", generator=g),
                        torch.randint(-8, 8, (N, K), device="cuda", generator=g)),
             "probe": (probe_a, probe_w)}
    sa, sw = torch.ones(M, device="cuda"), torch.ones(N, device="cuda")
    for name, (qa, qw) in cases.items():
        ref = qa.double() @ qw.double().T
        w8 = e4m3_weight(pack_int4_twos(qw))
        y = scaled_mm_w4a4(pack_e4m3(qa), sa, w8, sw, None, torch.float32)
        assert torch.equal(y.double(), ref), (name, int((y.double() != ref).sum()), float((y.double() - ref).abs().max()))


@gpu
@needs_scaled_mm
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quant_linear_fp8_path_gpu_model_shapes(dtype, monkeypatch):
    """LLaMA-3-8B's four linears at 2048 tokens (and an irregular 300): QuantLinear takes the fp8 path, its output
    equals the int8 path's within the output's rounding (the same codes, summed exactly by both), with a bias
    too; kron_quant's e4m3 codes match the reference at 8B factors, every byte written."""
    for n1, n2 in ((64, 64), (32, 128), (112, 128)):
        r = check_kron_quant(1003, n1, n2, dtype, True, "cuda", codes="e4m3")
        assert r["ok"] and r["all_written"], (n1, n2, r)
    monkeypatch.setattr(qlinear_mod, "FP8_MIN_TOKENS", 256)
    for (K, N, n1), M in zip(((4096, 6144, 64), (4096, 4096, 32), (4096, 28672, 64), (14336, 4096, 112)),
                             (2048, 300, 2048, 2048)):
        torch.manual_seed(K + N)
        R = torch.eye(K // n1) if n1 == 32 else _rand_factor(K // n1, "cpu").float()  # o_proj: H ⊗ I, R skipped
        layer = QuantLinear.from_float(torch.randn(N, K) * 0.02, L=_rand_factor(n1, "cpu").float(), R=R,
                                       act_clip=0.9, bias=torch.randn(N) * 0.1 if N == 6144 else None).cuda()
        x = torch.randn(M, K, dtype=dtype, device="cuda")
        assert layer.fp8_path(x)
        y = layer(x)
        q, s, _ = kron_quant(x, layer.L.to(dtype), layer.R.to(dtype), layer.act_clip, True)
        y_int8 = w4a4_gemm(q, s, layer.qweight, layer.wscale, None, None, layer.bias, dtype, path="int8")
        ulp = 2.0 ** (-10 if dtype == torch.float16 else -7)
        bad = (y.float() - y_int8.float()).abs() > ulp * y_int8.float().abs() + 1e-3
        assert not y.isnan().any() and int(bad.sum()) == 0, (K, N, M, dtype, int(bad.sum()))
        layer.fp8_weights = "keep"  # the e4m3 weights made once and kept: the same output
        assert torch.equal(layer(x), y) and torch.equal(layer(x), y) and len(layer._w8_cache) == 1


@needs_rerun
def test_interpreter_tests_in_subprocess():
    stdout = rerun_under_interpreter(__file__, timeout=600)
    assert int(stdout.split(" passed")[0].split()[-1]) >= 12, stdout[-500:]
